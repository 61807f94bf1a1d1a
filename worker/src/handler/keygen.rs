//! The `keygen` handler: one RSA key pair in OpenSSH format per item, as kuard's
//! workload does, with the `SHA256:` fingerprint (the form `ssh-keygen -l` prints) as
//! the item's result.
//!
//! Key generation takes seconds of CPU at 4096 bits, so it always runs on tokio's
//! blocking pool (`spawn_blocking`), never on the async threads that extend leases
//! and answer the coordinator.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ssh_key::private::{KeypairData, RsaKeypair};
use ssh_key::{HashAlg, LineEnding, PrivateKey};

use super::{Item, Outcome};

/// Key size when `--bits` is not given: kuard's, and a sane default for real keys.
pub const DEFAULT_BITS: usize = 4096;

/// A freshly generated RSA key pair.
pub struct Key {
    private: PrivateKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Key {
    /// Generates a key pair. CPU-bound for seconds: call it from a blocking thread.
    pub fn generate(bits: usize, comment: &str) -> Result<Key, ssh_key::Error> {
        let keypair = RsaKeypair::random(&mut rand::rng(), bits)?;
        let private = PrivateKey::new(KeypairData::Rsa(keypair), comment)?;
        Ok(Key { private })
    }

    /// Generates a key pair on tokio's blocking pool.
    pub async fn generate_blocking(bits: usize, comment: String) -> Result<Key, String> {
        match tokio::task::spawn_blocking(move || Key::generate(bits, &comment)).await {
            Ok(Ok(key)) => Ok(key),
            Ok(Err(e)) => Err(format!("generating a {bits}-bit RSA key: {e}")),
            Err(e) => Err(format!("key generation thread failed: {e}")),
        }
    }

    /// `SHA256:` + unpadded base64 of SHA-256 over the public key blob, as
    /// `ssh-keygen -l` and kuard print it.
    pub fn fingerprint(&self) -> String {
        self.private
            .public_key()
            .fingerprint(HashAlg::Sha256)
            .to_string()
    }

    /// Writes `DIR/NAME` (private key, mode 0600, which `ssh-keygen` insists on) and
    /// `DIR/NAME.pub`. Each file is written to a temporary name and renamed, so a
    /// reader never sees half a key. Returns the private key's path.
    pub fn write_pair(&self, dir: &Path, name: &str) -> std::io::Result<PathBuf> {
        let private_path = dir.join(name);
        let public_path = dir.join(format!("{name}.pub"));
        let private = self
            .private
            .to_openssh(LineEnding::LF)
            .map_err(std::io::Error::other)?;
        let public = self
            .private
            .public_key()
            .to_openssh()
            .map_err(std::io::Error::other)?;
        write_atomically(&private_path, private.as_bytes(), 0o600)?;
        write_atomically(&public_path, format!("{public}\n").as_bytes(), 0o644)?;
        Ok(private_path)
    }
}

fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("key");
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)
}

/// Checks `--out DIR` up front (creating it if needed), so a bad directory is a usage
/// error at start rather than a failure on every item.
pub fn prepare_out_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".workq-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(&probe)
}

/// The queue handler: one key per item.
#[derive(Debug)]
pub struct Keygen {
    pub bits: usize,
    /// Where to write each item's key pair (`item-ID`, `item-ID.pub`); keys are only
    /// fingerprinted and dropped without it, as in kuard.
    pub out: Option<PathBuf>,
}

impl Keygen {
    pub async fn run(&self, item: &Item) -> Outcome {
        let comment = format!("workq:{}/{}", item.queue, item.id);
        let key = match Key::generate_blocking(self.bits, comment).await {
            Ok(key) => key,
            Err(e) => return Outcome::Retry(e),
        };
        let fingerprint = key.fingerprint();
        if let Some(dir) = &self.out {
            let dir = dir.clone();
            let name = format!("item-{}", item.id);
            let written =
                tokio::task::spawn_blocking(move || key.write_pair(&dir, &name).map(|_| ())).await;
            match written {
                Ok(Ok(())) => {}
                // A full disk or a read-only volume fails every item alike: stop this
                // worker instead of burning the queue's attempts.
                Ok(Err(e)) => {
                    return Outcome::Fatal(format!(
                        "writing the key pair for item {} to {}: {e}",
                        item.id,
                        self.out.as_deref().unwrap_or(Path::new("")).display()
                    ));
                }
                Err(e) => return Outcome::Retry(format!("key writer thread failed: {e}")),
            }
        }
        tracing::info!(
            item = item.id,
            attempt = item.attempt,
            "Item done: {fingerprint}"
        );
        Outcome::Done(fingerprint.into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn fingerprint_is_sha256_base64_unpadded() {
        let key = Key::generate(1024, "test").unwrap();
        let fp = key.fingerprint();
        let b64 = fp.strip_prefix("SHA256:").expect("SHA256: prefix");
        assert_eq!(b64.len(), 43, "{fp}");
        assert!(!b64.contains('='), "{fp}");
    }

    #[test]
    fn writes_a_private_key_only_its_owner_can_read() {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::generate(1024, "workq:test/1").unwrap();
        let private = key.write_pair(dir.path(), "item-1").unwrap();
        let mode = std::fs::metadata(&private).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&private).unwrap();
        assert!(
            text.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"),
            "{text}"
        );
        let public = std::fs::read_to_string(dir.path().join("item-1.pub")).unwrap();
        assert!(public.starts_with("ssh-rsa AAAA"), "{public}");
        assert!(public.trim_end().ends_with("workq:test/1"), "{public}");
        // Overwriting keeps the mode strict.
        key.write_pair(dir.path(), "item-1").unwrap();
        let mode = std::fs::metadata(&private).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[tokio::test]
    async fn the_result_is_the_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let handler = Keygen {
            bits: 1024,
            out: Some(dir.path().to_path_buf()),
        };
        let item = Item {
            queue: "keygen".into(),
            id: 7,
            attempt: 1,
            payload: b"work-item-7".to_vec(),
            worker_id: "w".into(),
        };
        let Outcome::Done(result) = handler.run(&item).await else {
            panic!("keygen failed");
        };
        let fingerprint = String::from_utf8(result).unwrap();
        assert!(fingerprint.starts_with("SHA256:"), "{fingerprint}");
        assert!(dir.path().join("item-7").exists());
        assert!(dir.path().join("item-7.pub").exists());
    }
}
