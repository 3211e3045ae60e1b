//! Reductions written with eight running accumulators, so that the compiler vectorises them
//! (one running sum or maximum is a serial chain it may not reorder).

use super::Real;

/// Σ f(x) with eight partial sums: a vectorisable reduction (one running sum is a serial
/// chain the compiler may not reorder).
#[inline(always)]
pub(super) fn sum8_by<T: Real>(x: &[T], f: impl Fn(T) -> T) -> T {
    let mut acc = [T::zero(); 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    acc.iter().fold(chunks.remainder().iter().fold(T::zero(), |s, &v| s + f(v)), |s, &a| s + a)
}

/// The largest element (−∞ for an empty slice; NaNs are skipped), with eight running maxima:
/// vectorisable, where one `fold(max)` is a serial chain.
#[inline(always)]
pub(super) fn max8<T: Real>(x: &[T]) -> T {
    let larger = |m: T, v: T| if v > m { v } else { m };
    let mut acc = [T::neg_infinity(); 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = larger(*a, v);
        }
    }
    acc.iter().fold(chunks.remainder().iter().fold(T::neg_infinity(), |m, &v| larger(m, v)), |m, &a| larger(m, a))
}

/// Σ aᵢ bᵢ with eight running sums (vectorisable, where one fold is a serial chain).
#[inline(always)]
pub(super) fn dot8<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let (mut ca, mut cb) = (a.chunks_exact(8), b.chunks_exact(8));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail = ca.remainder().iter().zip(cb.remainder()).fold(T::zero(), |s, (&x, &y)| s + x * y);
    acc.iter().fold(tail, |s, &v| s + v)
}

/// Σ aᵢ bᵢ cᵢ with eight running sums (vectorisable).
#[inline(always)]
pub(super) fn dot3_8<T: Real>(a: &[T], b: &[T], c: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let (mut ca, mut cb, mut cc) = (a.chunks_exact(8), b.chunks_exact(8), c.chunks_exact(8));
    for ((x, y), z) in (&mut ca).zip(&mut cb).zip(&mut cc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i] * z[i];
        }
    }
    let tail = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .zip(cc.remainder())
        .fold(T::zero(), |s, ((&x, &y), &z)| s + x * y * z);
    acc.iter().fold(tail, |s, &v| s + v)
}

#[cfg(test)]
mod tests {
    /// max8 gives the maximum for every length around its 8-lane chunks, skips NaN, and is
    /// −∞ for an empty slice.
    #[test]
    fn max8_is_the_maximum() {
        for n in 0..40usize {
            let v: Vec<f32> = (0..n).map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.5).collect();
            let want = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(super::max8(&v), want, "length {n}");
        }
        assert_eq!(super::max8(&[1.0f32, f32::NAN, 3.0, -2.0]), 3.0);
    }
}
