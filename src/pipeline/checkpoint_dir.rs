//! A run's checkpoint: a folder of safetensors files plus `state.json`, replaced
//! atomically (written beside, then renamed) so a killed run always finds the last
//! complete one.

use crate::{Error, Result};
use serde::{de::DeserializeOwned, Serialize};
use std::path::{Path, PathBuf};

pub struct CheckpointDir {
    dir: PathBuf,
}

impl CheckpointDir {
    pub fn new(run_dir: &Path) -> CheckpointDir {
        CheckpointDir { dir: run_dir.join("checkpoint") }
    }

    /// The folder of the complete checkpoint, if any. A crash between the two renames
    /// of `save` leaves the previous one at `checkpoint.old`, which is then used.
    pub fn existing(&self) -> Option<PathBuf> {
        let old = self.dir.with_extension("old");
        [self.dir.clone(), old].into_iter().find(|d| d.join("state.json").exists())
    }

    /// Writes a new checkpoint: `write_files` fills a fresh folder, then `state` is
    /// written last (its presence marks the folder complete) and the folder replaces
    /// the previous checkpoint.
    pub fn save<S: Serialize>(&self, state: &S, write_files: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let tmp = self.dir.with_extension("tmp");
        let old = self.dir.with_extension("old");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        write_files(&tmp)?;
        if crate::failpoint::hit("checkpoint-write") {
            crate::failpoint::crash("checkpoint-write"); // files written, state.json not
        }
        let state_path = tmp.join("state.json");
        std::fs::write(&state_path, serde_json::to_vec_pretty(state).expect("state serialises")).map_err(|e| Error::io(&state_path, e))?;
        if self.dir.exists() {
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(&self.dir, &old).map_err(|e| Error::io(&self.dir, e))?;
        }
        if crate::failpoint::hit("checkpoint-rename") {
            crate::failpoint::crash("checkpoint-rename"); // only checkpoint.old and .tmp exist
        }
        std::fs::rename(&tmp, &self.dir).map_err(|e| Error::io(&tmp, e))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// The saved state and the folder holding the checkpoint's files.
    pub fn load<S: DeserializeOwned>(&self) -> Result<(S, PathBuf)> {
        let Some(dir) = self.existing() else {
            return Err(Error::Msg(format!("{}: no checkpoint to resume from", self.dir.display())));
        };
        let state_path = dir.join("state.json");
        let text = std::fs::read(&state_path).map_err(|e| Error::io(&state_path, e))?;
        let state = serde_json::from_slice(&text).map_err(|e| Error::Msg(format!("{}: {e}", state_path.display())))?;
        Ok((state, dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn save_replaces_atomically_and_loads() {
        let run = std::env::temp_dir().join(format!("dfkd-ckpt-test-{}", std::process::id()));
        let c = CheckpointDir::new(&run);
        assert!(c.existing().is_none());
        for i in 0..2u32 {
            c.save(&i, |d| std::fs::write(d.join("x.bin"), [i as u8]).map_err(|e| Error::io(d, e))).unwrap();
        }
        let (state, dir): (u32, _) = c.load().unwrap();
        assert_eq!((state, std::fs::read(dir.join("x.bin")).unwrap()), (1, vec![1]));
        // a failed write leaves the previous checkpoint in place
        assert!(c.save(&9u32, |_| Err(Error::Msg("disk full".into()))).is_err());
        assert_eq!(c.load::<u32>().unwrap().0, 1);
        std::fs::remove_dir_all(&run).unwrap();
    }
}
