//! The communicator of ranks started without MPI: by `lors-lm launch --nproc N` (one machine),
//! by `torchrun --no-python lors-lm ...`, or by anything that sets the same variables. Every
//! rank connects to rank 0 over TCP; a collective is each rank sending its part to rank 0,
//! which combines them in rank order and sends the result back. It carries the host
//! collectives of a run (losses, checks, checkpoints, the NCCL id) and, on CPU ranks, the
//! gradient all-reduce; on GPUs NCCL moves the gradients (`nccl.rs`), so a GPU machine needs
//! no MPI library. For CPU clusters, MPI's all-reduce is the faster engine (`mpi.rs`).
//!
//! ```text
//! variable            meaning                                    lors-lm launch sets
//! RANK                this rank, 0..WORLD_SIZE                   yes
//! WORLD_SIZE          ranks in the run                           --nproc
//! LOCAL_RANK          this rank's index on its machine           = RANK
//! LOCAL_WORLD_SIZE    ranks on this machine                      --nproc
//! MASTER_ADDR         the address rank 0 listens on              --master-addr (127.0.0.1)
//! MASTER_PORT         its port                                   --master-port (a free one)
//! ```
//!
//! torchrun's agent holds MASTER_PORT for its own store (it sets TORCHELASTIC_USE_AGENT_STORE),
//! so under torchrun rank 0 listens on MASTER_PORT + 1; `LORS_LM_MASTER_PORT` overrides both.
//!
//! Wire format: a frame is `[tag u8][length u64 LE][payload]`; a rank's first frame is a hello
//! (magic, rank, world size), which rank 0 checks before any collective.

use crate::train::distributed::Comm;
use anyhow::{anyhow, bail, Context, Result};
use std::cell::RefCell;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Where the ranks of a run meet, read from the environment (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    pub rank: usize,
    pub size: usize,
    /// (index on this machine, ranks on this machine).
    pub local: (usize, usize),
    pub addr: String,
    pub port: u16,
}

impl Rendezvous {
    /// The rendezvous described by `var` (an environment lookup): None unless RANK, WORLD_SIZE,
    /// MASTER_ADDR and MASTER_PORT are all set; an error naming the variable when one is not a
    /// number or they contradict each other.
    pub fn from_env_with(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let (Some(rank), Some(size), Some(addr), Some(port)) =
            (var("RANK"), var("WORLD_SIZE"), var("MASTER_ADDR"), var("MASTER_PORT"))
        else {
            return Ok(None);
        };
        let number = |name: &str, v: &str| -> Result<usize> {
            v.trim().parse().map_err(|_| {
                anyhow!("{name}={v:?} is not a whole number (set by the launcher: lors-lm launch, torchrun)")
            })
        };
        let (rank, size) = (number("RANK", &rank)?, number("WORLD_SIZE", &size)?);
        if size == 0 || rank >= size {
            bail!("RANK={rank} with WORLD_SIZE={size}: the rank must be below the world size");
        }
        let local_rank = var("LOCAL_RANK").map(|v| number("LOCAL_RANK", &v)).transpose()?.unwrap_or(rank);
        let local_size = var("LOCAL_WORLD_SIZE").map(|v| number("LOCAL_WORLD_SIZE", &v)).transpose()?.unwrap_or(size);
        if local_rank >= local_size {
            bail!("LOCAL_RANK={local_rank} with LOCAL_WORLD_SIZE={local_size}: the local rank must be below it");
        }
        let port_of = |name: &str, v: &str| -> Result<u16> {
            v.trim().parse().map_err(|_| anyhow!("{name}={v:?} is not a TCP port (1-65535)"))
        };
        let port = match var("LORS_LM_MASTER_PORT") {
            Some(p) => port_of("LORS_LM_MASTER_PORT", &p)?,
            None => {
                let p = port_of("MASTER_PORT", &port)?;
                match var("TORCHELASTIC_USE_AGENT_STORE") {
                    // torchrun's agent listens on MASTER_PORT itself.
                    Some(_) => {
                        p.checked_add(1).ok_or_else(|| anyhow!("MASTER_PORT={p}: no port above it for rank 0"))?
                    }
                    None => p,
                }
            }
        };
        if port == 0 {
            bail!("MASTER_PORT=0: rank 0 needs a fixed port that every rank knows");
        }
        Ok(Some(Self { rank, size, local: (local_rank, local_size), addr: addr.trim().to_string(), port }))
    }

    /// The rendezvous of this process, if a launcher set one.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_env_with(|name| std::env::var(name).ok())
    }
}

const MAGIC: &[u8; 8] = b"LORSDP01";
const HELLO: u8 = 0;

/// A collective's frame tag, for the error when ranks are out of step.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Op {
    SumF32 = 1,
    SumF64 = 2,
    Gather = 3,
    Broadcast = 4,
}

type Conn = (BufReader<TcpStream>, BufWriter<TcpStream>);

pub struct TcpComm {
    rdv: Rendezvous,
    /// Rank 0: one connection per other rank (index = rank - 1); others: the one to rank 0.
    conns: RefCell<Vec<Conn>>,
}

impl TcpComm {
    /// Join the run (every rank calls this at start-up): rank 0 listens and waits for the
    /// others, which retry connecting, all for at most `wait`.
    pub fn connect(rdv: &Rendezvous, wait: Duration) -> Result<Self> {
        let conns = match rdv.rank {
            0 => accept_all(rdv, wait)?,
            _ => vec![join(rdv, wait)?],
        };
        Ok(Self { rdv: rdv.clone(), conns: RefCell::new(conns) })
    }

    /// One collective: every rank's `mine` reaches rank 0, which returns `combine` of all of
    /// them (in rank order) to every rank. Every frame's size is known in advance (rank r's
    /// part is `part_len(r)` bytes, the result `result_len`): a frame of another size is ranks
    /// out of step, refused before its payload is read.
    fn exchange(
        &self,
        op: Op,
        mine: &[u8],
        part_len: impl Fn(usize) -> usize,
        result_len: usize,
        combine: impl FnOnce(Vec<Vec<u8>>) -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        let mut conns = self.conns.borrow_mut();
        if self.rdv.rank != 0 {
            let (r, w) = &mut conns[0];
            let gone = |e: std::io::Error| {
                anyhow!("rank 0 closed the connection during a collective ({e}): it failed, was killed or was stopped (its error or the launcher says which)")
            };
            write_frame(w, op as u8, mine).map_err(gone)?;
            return read_part(r, 0, op, result_len, gone);
        }
        let lost = |rank: usize| {
            move |e: std::io::Error| {
                anyhow!(
                    "rank {rank} closed its connection during a collective ({e}): it failed, was killed or was stopped (its error \
                     or the launcher says which)"
                )
            }
        };
        let mut all = Vec::with_capacity(self.rdv.size);
        all.push(mine.to_vec());
        for (i, (r, _)) in conns.iter_mut().enumerate() {
            all.push(read_part(r, i + 1, op, part_len(i + 1), lost(i + 1))?);
        }
        let result = combine(all)?;
        for (i, (_, w)) in conns.iter_mut().enumerate() {
            write_frame(w, op as u8, &result).map_err(lost(i + 1))?;
        }
        Ok(result)
    }

    fn sum<const N: usize>(
        &self,
        op: Op,
        send: &[u8],
        to: impl Fn([u8; N]) -> f64,
        from: impl Fn(f64) -> [u8; N],
    ) -> Result<Vec<u8>> {
        let len = send.len();
        self.exchange(
            op,
            send,
            |_| len,
            len,
            |parts| {
                let mut acc = vec![0.0f64; len / N];
                for p in &parts {
                    for (a, c) in acc.iter_mut().zip(p.chunks_exact(N)) {
                        *a += to(c.try_into().expect("chunks of N"));
                    }
                }
                Ok(acc.into_iter().flat_map(from).collect())
            },
        )
    }
}

/// Rank `rank`'s frame of collective `op`, which must be `len` bytes; `io` names the rank in
/// a connection error.
fn read_part(
    r: &mut impl Read,
    rank: usize,
    op: Op,
    len: usize,
    io: impl Fn(std::io::Error) -> anyhow::Error,
) -> Result<Vec<u8>> {
    let (tag, got) = read_head(r).map_err(&io)?;
    check_step(rank, tag, op)?;
    if got != len as u64 {
        bail!(
            "ranks out of step: rank {rank} sent {got} bytes for {op:?} where this rank expects {len} \
             (do all ranks train the same config?)"
        );
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(io)?;
    Ok(payload)
}

/// An error unless rank `rank`'s frame is the collective this rank is in.
fn check_step(rank: usize, tag: u8, op: Op) -> Result<()> {
    if tag != op as u8 {
        bail!("ranks out of step: rank {rank} sent collective #{tag} while this rank is in {op:?} (#{})", op as u8);
    }
    Ok(())
}

fn write_frame(w: &mut impl Write, tag: u8, payload: &[u8]) -> std::io::Result<()> {
    w.write_all(&[tag])?;
    w.write_all(&(payload.len() as u64).to_le_bytes())?;
    w.write_all(payload)?;
    w.flush()
}

/// A frame's tag and payload length.
fn read_head(r: &mut impl Read) -> std::io::Result<(u8, u64)> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head)?;
    Ok((head[0], u64::from_le_bytes(head[1..].try_into().expect("8 bytes"))))
}

/// A frame of at most `max` bytes (the hello, from a peer not yet known to be a rank).
fn read_frame_up_to(r: &mut impl Read, max: u64) -> std::io::Result<(u8, Vec<u8>)> {
    let (tag, len) = read_head(r)?;
    if len > max {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a frame of {len} bytes")));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    Ok((tag, payload))
}

fn hello(rank: usize, size: usize) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend((rank as u64).to_le_bytes());
    h.extend((size as u64).to_le_bytes());
    h
}

fn conn(stream: TcpStream) -> Result<Conn> {
    stream.set_nodelay(true)?;
    Ok((BufReader::new(stream.try_clone()?), BufWriter::new(stream)))
}

/// Rank 0: listen on the rendezvous port and take one connection from every other rank.
fn accept_all(rdv: &Rendezvous, wait: Duration) -> Result<Vec<Conn>> {
    let at = format!("{}:{}", rdv.addr, rdv.port);
    let listener = TcpListener::bind(&at).map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => anyhow!(
            "rank 0 cannot listen on {at}: the port is in use (another run?); choose another with \
             `lors-lm launch --master-port` or MASTER_PORT"
        ),
        _ => anyhow!("rank 0 cannot listen on {at} ({e}): MASTER_ADDR must be an address of rank 0's machine"),
    })?;
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + wait;
    let mut slots: Vec<Option<Conn>> = (1..rdv.size).map(|_| None).collect();
    while slots.iter().any(Option::is_none) {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(Duration::from_secs(30)))?;
                let mut c = conn(stream)?;
                // A stranger (a port scanner, another run) is dropped, not trusted.
                let Ok((HELLO, h)) = read_frame_up_to(&mut c.0, 64) else { continue };
                if h.len() != 24 || &h[..8] != MAGIC {
                    continue;
                }
                let rank = u64::from_le_bytes(h[8..16].try_into()?) as usize;
                let size = u64::from_le_bytes(h[16..24].try_into()?) as usize;
                if size != rdv.size {
                    bail!("rank {rank} (from {peer}) was started with WORLD_SIZE={size}, rank 0 with {}: launch every rank with the same world size", rdv.size);
                }
                if rank == 0 || rank >= rdv.size || slots[rank - 1].is_some() {
                    bail!("two processes claim rank {rank} (the second from {peer}): every rank needs its own RANK");
                }
                c.0.get_ref().set_read_timeout(None)?;
                write_frame(&mut c.1, HELLO, MAGIC)?;
                slots[rank - 1] = Some(c);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let missing: Vec<String> = slots
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| s.is_none())
                        .map(|(i, _)| (i + 1).to_string())
                        .collect();
                    bail!(
                        "rank 0 waited {:.0} s on {at} for rank(s) {} to connect: were they started, with the same \
                         MASTER_ADDR and MASTER_PORT? (--collective-timeout sets the wait)",
                        wait.as_secs_f64(),
                        missing.join(", ")
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("rank 0 accepting connections on {at}")),
        }
    }
    Ok(slots.into_iter().map(|s| s.expect("every slot filled")).collect())
}

/// Another rank: connect to rank 0 (retrying while it starts), say who this is, await its yes.
fn join(rdv: &Rendezvous, wait: Duration) -> Result<Conn> {
    let at = format!("{}:{}", rdv.addr, rdv.port);
    let deadline = Instant::now() + wait;
    let stream = loop {
        let addrs = at.to_socket_addrs().with_context(|| format!("MASTER_ADDR {:?} does not resolve", rdv.addr))?;
        match addrs.into_iter().find_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok()) {
            Some(s) => break s,
            None if Instant::now() > deadline => bail!(
                "rank {} could not reach rank 0 at {at} in {:.0} s: is rank 0 running, and are MASTER_ADDR and \
                 MASTER_PORT the same for every rank? (--collective-timeout sets the wait)",
                rdv.rank,
                wait.as_secs_f64()
            ),
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let mut c = conn(stream)?;
    // Another program on the port may never answer.
    c.0.get_ref().set_read_timeout(Some(wait.max(Duration::from_secs(1))))?;
    write_frame(&mut c.1, HELLO, &hello(rdv.rank, rdv.size))?;
    match read_frame_up_to(&mut c.0, 64) {
        Ok((HELLO, m)) if m == MAGIC => {
            c.0.get_ref().set_read_timeout(None)?;
            Ok(c)
        }
        Ok(_) => bail!("{at} answered, but not as rank 0 of a lors-lm run: is MASTER_PORT another program's?"),
        Err(e) => bail!("rank 0 at {at} refused rank {} ({e}): its error says why", rdv.rank),
    }
}

impl Comm for TcpComm {
    fn rank(&self) -> usize {
        self.rdv.rank
    }
    fn size(&self) -> usize {
        self.rdv.size
    }
    fn local(&self) -> (usize, usize) {
        self.rdv.local
    }
    fn sum_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let bytes: Vec<u8> = send.iter().flat_map(|v| v.to_le_bytes()).collect();
        // Summed in f64 in rank order, then rounded once: the same on every rank.
        let out = self.sum::<4>(Op::SumF32, &bytes, |b| f32::from_le_bytes(b) as f64, |v| (v as f32).to_le_bytes())?;
        for (r, c) in recv.iter_mut().zip(out.chunks_exact(4)) {
            *r = f32::from_le_bytes(c.try_into()?);
        }
        Ok(())
    }
    fn sum_f64(&self, send: &[f64], recv: &mut [f64]) -> Result<()> {
        let bytes: Vec<u8> = send.iter().flat_map(|v| v.to_le_bytes()).collect();
        let out = self.sum::<8>(Op::SumF64, &bytes, f64::from_le_bytes, f64::to_le_bytes)?;
        for (r, c) in recv.iter_mut().zip(out.chunks_exact(8)) {
            *r = f64::from_le_bytes(c.try_into()?);
        }
        Ok(())
    }
    fn gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        let out =
            self.exchange(Op::Gather, &value.to_le_bytes(), |_| 8, 8 * self.rdv.size, |parts| Ok(parts.concat()))?;
        out.chunks_exact(8).map(|c| Ok(u64::from_le_bytes(c.try_into()?))).collect()
    }
    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        let mine: &[u8] = if self.rdv.rank == root { buf } else { &[] };
        if root >= self.rdv.size {
            bail!("a broadcast from rank {root} in a run of {} ranks", self.rdv.size);
        }
        let len = buf.len();
        let part_len = |r: usize| if r == root { len } else { 0 };
        let out =
            self.exchange(Op::Broadcast, mine, part_len, len, |mut parts| Ok(std::mem::take(&mut parts[root])))?;
        buf.copy_from_slice(&out);
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        // Closing the sockets ends the other ranks' next collective with an error (and
        // `lors-lm launch` stops them as soon as one rank fails).
        super::exit_now(code)
    }
    fn describe(&self) -> String {
        format!("TCP through rank 0 at {}:{}", self.rdv.addr, self.rdv.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }

    const RUN: [(&str, &str); 4] =
        [("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")];

    #[test]
    fn the_rendezvous_is_read_from_torchrun_style_variables() {
        assert_eq!(Rendezvous::from_env_with(env(&RUN[..3])).unwrap(), None, "no MASTER_PORT: not a launch");
        let r = Rendezvous::from_env_with(env(&RUN)).unwrap().unwrap();
        assert_eq!((r.rank, r.size, r.local, r.port), (1, 2, (1, 2), 29500));
        let torchrun = [
            RUN.as_slice(),
            &[("TORCHELASTIC_USE_AGENT_STORE", "True"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")],
        ]
        .concat();
        let r = Rendezvous::from_env_with(env(&torchrun)).unwrap().unwrap();
        assert_eq!((r.local, r.port), ((0, 1), 29501), "torchrun's agent holds MASTER_PORT");
        let own = [torchrun.as_slice(), &[("LORS_LM_MASTER_PORT", "4000")]].concat();
        assert_eq!(Rendezvous::from_env_with(env(&own)).unwrap().unwrap().port, 4000);
        for (bad, says) in [
            ([("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")], "below the world size"),
            ([("RANK", "x"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")], "RANK=\"x\""),
            (
                [("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "70000")],
                "MASTER_PORT=\"70000\"",
            ),
            ([("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "0")], "fixed port"),
        ] {
            let err = Rendezvous::from_env_with(env(&bad)).unwrap_err().to_string();
            assert!(err.contains(says), "{err}");
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// `f` on each of `n` ranks (threads of this process) joined on a fresh port.
    fn ranks<T: Send + 'static>(n: usize, f: impl Fn(TcpComm) -> T + Send + Sync + Copy + 'static) -> Vec<T> {
        let port = free_port();
        let threads: Vec<_> = (0..n)
            .map(|rank| {
                std::thread::spawn(move || {
                    let rdv = Rendezvous { rank, size: n, local: (rank, n), addr: "127.0.0.1".into(), port };
                    f(TcpComm::connect(&rdv, Duration::from_secs(20)).unwrap())
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    }

    #[test]
    fn three_ranks_sum_gather_and_broadcast() {
        let out = ranks(3, |c| {
            let r = c.rank();
            let mut s32 = [0.0f32; 3];
            c.sum_f32(&[r as f32, 0.5, -(r as f32) * 2.0], &mut s32).unwrap();
            let mut s64 = [0.0f64; 1];
            c.sum_f64(&[1e-17 + r as f64], &mut s64).unwrap();
            let all = c.gather_u64(100 + r as u64).unwrap();
            let mut buf = if r == 2 { *b"from2" } else { [0u8; 5] };
            c.broadcast(&mut buf, 2).unwrap();
            (s32, s64, all, buf)
        });
        for (s32, s64, all, buf) in out {
            assert_eq!(s32, [3.0, 1.5, -6.0]);
            assert_eq!(s64[0], 3.0 + 3e-17);
            assert_eq!(all, vec![100, 101, 102]);
            assert_eq!(&buf, b"from2");
        }
    }

    #[test]
    fn ranks_out_of_step_get_an_error_not_a_wrong_answer() {
        let out = ranks(2, |c| match c.rank() {
            0 => c.gather_u64(7).map(|_| ()).unwrap_err().to_string(),
            _ => {
                let mut s = [0.0f64];
                c.sum_f64(&[1.0], &mut s).map(|_| ()).unwrap_err().to_string()
            }
        });
        assert!(out[0].contains("ranks out of step"), "{}", out[0]);
        assert!(out[1].contains("rank 0 closed the connection"), "{}", out[1]);
    }

    #[test]
    fn a_part_of_the_wrong_size_is_refused_before_it_is_read() {
        let out = ranks(2, |c| {
            let mut s = [0.0f64; 2];
            let send = if c.rank() == 0 { &[1.0, 2.0][..] } else { &[1.0][..] };
            c.sum_f64(send, &mut s[..send.len()]).map(|_| ()).unwrap_err().to_string()
        });
        assert!(out[0].contains("rank 1 sent 8 bytes for SumF64 where this rank expects 16"), "{}", out[0]);
        // A corrupt or hostile length (2^60 bytes) is an error, not an allocation.
        let mut frame = vec![Op::SumF32 as u8];
        frame.extend((1u64 << 60).to_le_bytes());
        let err = read_part(&mut &frame[..], 3, Op::SumF32, 4, |e| anyhow!("{e}")).unwrap_err().to_string();
        assert!(err.contains("rank 3 sent 1152921504606846976 bytes"), "{err}");
    }

    #[test]
    fn a_rank_that_never_comes_is_named_after_the_wait() {
        let rdv = Rendezvous { rank: 0, size: 3, local: (0, 3), addr: "127.0.0.1".into(), port: free_port() };
        let err = TcpComm::connect(&rdv, Duration::from_millis(300)).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("rank(s) 1, 2 to connect"), "{err}");
        let rdv = Rendezvous { rank: 1, ..rdv };
        let err = TcpComm::connect(&rdv, Duration::from_millis(300)).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("rank 1 could not reach rank 0"), "{err}");
    }
}
