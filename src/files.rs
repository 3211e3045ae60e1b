//! File-system helpers every layer may use: atomic writes, and where a path lies relative to
//! a directory (so that commands never write over, or delete, what they read).

use anyhow::{Context, Result};
use std::fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

/// Writes `path` through a temp file in the same directory (`.NAME.tmp`), fsynced and renamed
/// into place on success: a reader sees the old file or the new one, never half of one, and a
/// failed write leaves no temp file behind.
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut BufWriter<fs::File>) -> std::io::Result<()>) -> Result<()> {
    let tmp = temp_path(path)?;
    let result = (|| {
        let file = fs::File::create(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        write(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(err) = result {
        let _ = fs::remove_file(&tmp);
        return Err(err).with_context(|| format!("could not write {}", path.display()));
    }
    Ok(())
}

/// The temp file [`write_atomic`] writes `path` through.
pub fn temp_path(path: &Path) -> Result<PathBuf> {
    let name = path.file_name().with_context(|| format!("{} is not a file path", path.display()))?;
    Ok(path.with_file_name(format!(".{}.tmp", name.to_string_lossy())))
}

/// Whether `path` is `dir` or lies inside it, after resolving `.`, `..` and symbolic links
/// (false when either does not exist: nothing there to harm).
pub fn is_within(path: &Path, dir: &Path) -> bool {
    match (path.canonicalize(), dir.canonicalize()) {
        (Ok(p), Ok(d)) => p.starts_with(d),
        _ => false,
    }
}

/// Whether two paths name the same existing file or directory.
pub fn same_path(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}
