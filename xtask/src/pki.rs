//! Certificates for mutual TLS, made with `openssl` in one directory: a
//! CA, and keys with certificates it signs. The test cluster's and the
//! remote builders' alike; keys are readable by their owner alone.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::exec::{Cmd, Exec};

/// A directory of keys and certificates: `NAME.key`, `NAME.crt`.
pub struct Pki<'a> {
    dir: PathBuf,
    exec: &'a Exec<'a>,
}

impl<'a> Pki<'a> {
    pub fn new(exec: &'a Exec<'a>, dir: PathBuf) -> Pki<'a> {
        Pki { dir, exec }
    }

    pub fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// A new RSA key `NAME.key`, mode 0600.
    pub fn key(&self, name: &str) -> Result<()> {
        let key = self.file(&format!("{name}.key"));
        self.exec
            .run(&Cmd::new("openssl").args(["genrsa", "-out", &key, "2048"]))?;
        if !self.exec.dry_run {
            restrict(Path::new(&key), 0o600)?;
        }
        Ok(())
    }

    /// The CA: `ca.key` and a self-signed `ca.crt` for `subject`.
    pub fn ca(&self, subject: &str) -> Result<()> {
        self.key("ca")?;
        self.exec.run(&Cmd::new("openssl").args([
            "req",
            "-x509",
            "-new",
            "-key",
            &self.file("ca.key"),
            "-subj",
            subject,
            "-days",
            "3650",
            "-out",
            &self.file("ca.crt"),
        ]))
    }

    /// `NAME.crt` for `NAME.key`, signed by the CA with `extensions`
    /// (an openssl extension file's lines).
    pub fn sign(&self, name: &str, subject: &str, extensions: &str) -> Result<()> {
        let ext = self.file(&format!("{name}.ext"));
        if !self.exec.dry_run {
            std::fs::write(&ext, extensions).with_context(|| format!("writing {ext}"))?;
        }
        let csr = self.file(&format!("{name}.csr"));
        self.exec.run(&Cmd::new("openssl").args([
            "req",
            "-new",
            "-key",
            &self.file(&format!("{name}.key")),
            "-subj",
            subject,
            "-out",
            &csr,
        ]))?;
        self.exec.run(&Cmd::new("openssl").args([
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &self.file("ca.crt"),
            "-CAkey",
            &self.file("ca.key"),
            "-CAcreateserial",
            "-days",
            "3650",
            "-extfile",
            &ext,
            "-out",
            &self.file(&format!("{name}.crt")),
        ]))
    }
}

/// Sets `path`'s mode (`0o600` for a key: its owner alone reads it).
pub fn restrict(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {} to {mode:o}", path.display()))
}
