//! Run folders that cannot destroy data. A run folder is one dfkd made: it holds the
//! marker file `.dfkd-run`, and dfkd removes files only in such a folder, only the
//! ones it writes itself, and only when told to (`--overwrite`). A process holds the
//! folder through an OS lock on `.dfkd-lock` for as long as it runs, so a second
//! process on the same folder fails at once; the kernel drops the lock when its holder
//! dies, so a lock left by a killed run never blocks.

use crate::{bail, Error, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Written into every run folder dfkd makes.
pub const MARKER: &str = ".dfkd-run";
/// Locked (flock) by the process that holds the run; names its PID for the others.
pub const LOCK: &str = ".dfkd-lock";
/// What a run writes, and so all that `--overwrite` may remove.
const OUTPUTS: [&str; 4] = ["checkpoint", "checkpoint.old", "checkpoint.tmp", "images"];
const OUTPUT_FILES: [&str; 8] =
    ["metrics.jsonl", "config.toml", "student.safetensors", "losses_student.png", "losses_generator.png", "accuracy.png", "teacher.png", "metrics.jsonl.tmp"];

/// How a run treats an existing folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A new run: the folder must not hold one.
    Fresh,
    /// Continue the run in the folder from its checkpoint.
    Resume,
    /// Replace the run in the folder (only one dfkd made).
    Overwrite,
}

/// A run folder held by this process. Nothing in it has been removed yet: `prepare`
/// does that, once the caller has checked everything it can.
pub struct RunDir {
    path: PathBuf,
    mode: Mode,
    // the open file holds the lock; dropping it releases it
    _lock: File,
}

impl RunDir {
    /// Checks that `path` may be used in `mode` and locks it. Creates the folder (with
    /// its marker) when it does not exist; removes nothing.
    pub fn claim(path: &Path, mode: Mode) -> Result<RunDir> {
        let shown = path.display();
        if path.exists() && !path.is_dir() {
            bail!("run folder {shown} exists and is not a folder");
        }
        let ours = path.join(MARKER).is_file();
        let legacy = is_legacy_run(path);
        // empty but for our own marker and lock: a run that stopped before writing
        // anything (e.g. at a data set check) may simply be started again
        let empty = path.is_dir()
            && std::fs::read_dir(path).map_err(|e| Error::io(path, e))?.all(|e| e.is_ok_and(|e| e.file_name() == MARKER || e.file_name() == LOCK));
        match mode {
            _ if !path.exists() && mode == Mode::Resume => bail!("--resume: run folder {shown} does not exist, so there is no run to resume"),
            _ if !path.exists() || empty => {}
            // a folder that dfkd did not make is never written to, whatever the flags
            _ if !ours && !legacy => bail!(
                "run folder {shown} exists and was not made by dfkd (no {MARKER} file in it); \
                 dfkd writes and removes files only in its own run folders: pick another --run"
            ),
            Mode::Fresh => bail!(
                "run folder {shown} already holds a run; add --resume to continue it from its checkpoint, \
                 or --overwrite to replace it (or pick another --run)"
            ),
            Mode::Resume | Mode::Overwrite => {}
        }
        std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
        let lock = lock(path)?;
        let marker = path.join(MARKER);
        if !marker.exists() {
            std::fs::write(&marker, "a dfkd run folder: dfkd may replace its outputs here (--overwrite)\n").map_err(|e| Error::io(&marker, e))?;
        }
        Ok(RunDir { path: path.to_path_buf(), mode, _lock: lock })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// For `Overwrite`: removes the previous run's outputs (only the names a run
    /// writes; anything else the user put there stays). Nothing for the other modes.
    pub fn prepare(&self) -> Result<()> {
        if self.mode != Mode::Overwrite {
            return Ok(());
        }
        for sub in OUTPUTS {
            let p = self.path.join(sub);
            if p.exists() {
                std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
        for f in OUTPUT_FILES {
            let p = self.path.join(f);
            if p.exists() {
                std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
        Ok(())
    }
}

/// A run folder made before the marker existed: its config and checkpoint are there.
/// It may be resumed or overwritten (and is marked then), as it holds only outputs of
/// dfkd's own.
fn is_legacy_run(path: &Path) -> bool {
    path.join("config.toml").is_file() && path.join("checkpoint").join("state.json").is_file()
}

/// Takes the folder's lock, or fails naming the process that holds it.
fn lock(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK);
    let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(|e| Error::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() { "another process".to_string() } else { format!("process {holder}") };
            bail!("run folder {} is in use by {who} (it holds {}); wait for it to finish or pick another --run", dir.display(), path.display());
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
    }
    // the PID is only for the message above: the lock itself is the kernel's
    let write = file.set_len(0).and_then(|_| file.rewind()).and_then(|_| write!(file, "{}", std::process::id())).and_then(|_| file.flush());
    write.map_err(|e| Error::io(&path, e))?;
    Ok(file)
}

/// The first of `base`, `base-2`, `base-3`, ... under `parent` that does not exist: the
/// bare demo command never replaces an earlier demo run.
pub fn first_free(parent: &Path, base: &str) -> PathBuf {
    let first = parent.join(base);
    if !first.exists() {
        return first;
    }
    (2..).map(|k| parent.join(format!("{base}-{k}"))).find(|p| !p.exists()).expect("some name is free")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dfkd-rundir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn only_folders_dfkd_made_are_reused_and_only_when_told() {
        let d = tmp("modes");
        assert!(RunDir::claim(&d, Mode::Resume).err().unwrap().to_string().contains("no run to resume"));
        drop(RunDir::claim(&d, Mode::Fresh).unwrap());
        std::fs::create_dir_all(d.join("checkpoint")).unwrap();
        std::fs::write(d.join("checkpoint/state.json"), "{}").unwrap();
        std::fs::write(d.join("notes.txt"), "mine").unwrap();
        let e = RunDir::claim(&d, Mode::Fresh).err().unwrap().to_string();
        assert!(e.contains("--resume") && e.contains("--overwrite"), "{e}");
        assert!(d.join("checkpoint/state.json").exists(), "a refused fresh run must not remove the checkpoint");
        drop(RunDir::claim(&d, Mode::Resume).unwrap());
        let r = RunDir::claim(&d, Mode::Overwrite).unwrap();
        assert!(d.join("checkpoint/state.json").exists(), "claim removes nothing");
        r.prepare().unwrap();
        assert!(!d.join("checkpoint").exists() && d.join("notes.txt").exists() && d.join(MARKER).exists());
        drop(r);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_folder_without_the_marker_is_refused_in_every_mode() {
        let d = tmp("foreign");
        std::fs::create_dir_all(d.join("images")).unwrap();
        std::fs::write(d.join("images/a.jpg"), "x").unwrap();
        for mode in [Mode::Fresh, Mode::Resume, Mode::Overwrite] {
            let e = RunDir::claim(&d, mode).err().unwrap().to_string();
            assert!(e.contains("not made by dfkd") && e.contains(MARKER), "{mode:?}: {e}");
        }
        assert!(d.join("images/a.jpg").exists() && !d.join(MARKER).exists() && !d.join(LOCK).exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_held_folder_is_refused_naming_the_holder_and_freed_on_drop() {
        let d = tmp("lock");
        let held = RunDir::claim(&d, Mode::Fresh).unwrap();
        let e = RunDir::claim(&d, Mode::Resume).err().unwrap().to_string();
        assert!(e.contains(&format!("in use by process {}", std::process::id())), "{e}");
        drop(held);
        drop(RunDir::claim(&d, Mode::Resume).unwrap());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn first_free_counts_up() {
        let d = tmp("free");
        assert_eq!(first_free(&d, "demo"), d.join("demo"));
        std::fs::create_dir_all(d.join("demo")).unwrap();
        std::fs::create_dir_all(d.join("demo-2")).unwrap();
        assert_eq!(first_free(&d, "demo"), d.join("demo-3"));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
