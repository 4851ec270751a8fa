//! `--tls`: wss:// runs. A self-signed certificate made once per run ([`TlsFiles`]), the
//! generator's rustls client configuration that trusts exactly it, the TLS peer's server
//! configuration, and the layer the generator puts under its frame writer and reader
//! ([`flush`], [`decrypt`]) when a connection speaks TLS.
//!
//! Both sides use rustls 0.23 with the `ring` provider and its default protocol versions and
//! cipher suites, as ringsock's `TlsConfig::from_pem_files` does, so every server under test
//! negotiates the same suite. The plain path never comes here.

use std::io::{self, Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig};

/// The certificate and key of one run, as PEM files the servers read, and the client
/// configuration that trusts the certificate.
#[derive(Debug)]
pub struct TlsFiles {
    /// The certificate (PEM), valid for `localhost` and 127.0.0.1.
    pub cert: PathBuf,
    /// Its private key (PEM, ECDSA P-256: rcgen's default).
    pub key: PathBuf,
    /// What the generator's clients connect with.
    pub client: Arc<ClientConfig>,
}

impl TlsFiles {
    /// Makes a self-signed certificate for `localhost` and 127.0.0.1, writes it and its key to
    /// `dir` (`cert.pem`, `key.pem`), and builds a client configuration whose only root is it.
    ///
    /// # Errors
    ///
    /// The certificate cannot be made, or `dir` cannot be written.
    pub fn generate(dir: &Path) -> Result<TlsFiles, String> {
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let made = rcgen::generate_simple_self_signed(names).map_err(|e| format!("rcgen: {e}"))?;
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, made.cert.pem()).map_err(|e| format!("{}: {e}", cert.display()))?;
        std::fs::write(&key, made.signing_key.serialize_pem())
            .map_err(|e| format!("{}: {e}", key.display()))?;
        let mut roots = RootCertStore::empty();
        roots
            .add(made.cert.der().clone())
            .map_err(|e| format!("trust the certificate: {e}"))?;
        Ok(TlsFiles {
            cert,
            key,
            client: client_config(roots)?,
        })
    }

    /// The certificate and key as the arguments `flag CERT KEY` (ringsock's `--tls`) or
    /// `--cert CERT --key KEY` (the peer's `serve`).
    pub fn args(&self, ringsock: bool) -> Vec<String> {
        let (cert, key) = (
            self.cert.display().to_string(),
            self.key.display().to_string(),
        );
        if ringsock {
            vec!["--tls".into(), cert, key]
        } else {
            vec!["--cert".into(), cert, "--key".into(), key]
        }
    }
}

/// A client configuration whose only root is the certificate in the PEM file `cert` (the one
/// a server under `bench` was started with).
///
/// # Errors
///
/// The file cannot be read or holds no usable certificate.
pub fn trusting(cert: &Path) -> Result<Arc<ClientConfig>, String> {
    let named = |e: &dyn std::fmt::Display| format!("{}: {e}", cert.display());
    let mut roots = RootCertStore::empty();
    for der in CertificateDer::pem_file_iter(cert).map_err(|e| named(&e))? {
        roots
            .add(der.map_err(|e| named(&e))?)
            .map_err(|e| named(&e))?;
    }
    if roots.is_empty() {
        return Err(named(&"no CERTIFICATE block"));
    }
    client_config(roots)
}

/// The generator's client configuration: `ring`, rustls' default protocol versions.
fn client_config(roots: RootCertStore) -> Result<Arc<ClientConfig>, String> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// `config` with records of at most `bytes` on the wire before the AEAD tag (rustls'
/// `max_fragment_size`, which counts the 5-byte header), e.g. to keep each record inside one
/// of a server's receive buffers.
///
/// # Errors
///
/// `bytes` is out of rustls' range (32 to 16 KiB + 5).
pub fn with_max_record(
    config: &Arc<ClientConfig>,
    bytes: usize,
) -> Result<Arc<ClientConfig>, String> {
    if !(32..=(16 << 10) + 5).contains(&bytes) {
        return Err(format!("--tls-record {bytes}: not in 32..=16389"));
    }
    let mut config = (**config).clone();
    config.max_fragment_size = Some(bytes);
    Ok(Arc::new(config))
}

/// rustls' `ring` provider, the one ringsock's server uses.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS peer's server configuration from PEM files: the same provider and protocol
/// versions as ringsock's `TlsConfig::from_pem_files`, ALPN `http/1.1` as ringsock offers.
///
/// # Errors
///
/// A file cannot be read, or the key does not fit the certificate.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|c| c.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client connection to `addr` (its IP address is the name verified).
///
/// # Errors
///
/// rustls refused the configuration.
pub fn client(config: &Arc<ClientConfig>, addr: SocketAddr) -> Result<ClientConnection, String> {
    let name = ServerName::IpAddress(addr.ip().into());
    ClientConnection::new(Arc::clone(config), name).map_err(|e| format!("TLS client: {e}"))
}

/// The socket `fd` as `io::Read`/`io::Write` for rustls, without taking ownership.
struct Fd(i32);

impl io::Read for Fd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        crate::generator::read_fd(self.0, buf)?.ok_or_else(|| io::ErrorKind::WouldBlock.into())
    }
}

impl io::Write for Fd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let count = bufs.len().min(libc::c_int::MAX as usize) as libc::c_int;
        loop {
            // SAFETY: `IoSlice` is ABI-compatible with `iovec` on Unix, and the slices outlive
            // the call, which only reads them.
            let rc = unsafe { libc::writev(self.0, bufs.as_ptr().cast(), count) };
            if rc >= 0 {
                return Ok(rc as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes the ciphertext rustls holds for the socket `fd`; `Ok(false)` if the socket filled up
/// first (its writable edge resumes).
///
/// # Errors
///
/// A write error other than a full socket.
pub fn write_ciphertext(tls: &mut ClientConnection, fd: i32) -> io::Result<bool> {
    while tls.wants_write() {
        match tls.write_tls(&mut Fd(fd)) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Encrypts and writes as much of `plain` (the queued frames, in order) as the socket takes,
/// several frames to a record: pending ciphertext goes first, then the frames are handed to
/// rustls in one vectored write per up to 64 KiB (its send buffer limit). Returns the
/// plaintext bytes taken; the rest waits for the next flush.
///
/// # Errors
///
/// A write error other than a full socket, or a TLS error.
pub fn flush(tls: &mut ClientConnection, fd: i32, plain: &[io::IoSlice<'_>]) -> io::Result<usize> {
    let total: usize = plain.iter().map(|s| s.len()).sum();
    let mut taken = 0;
    let mut skip = 0;
    while write_ciphertext(tls, fd)? && taken < total {
        // Slices from `taken` on: whole ones after the first partly taken one.
        let mut first = skip;
        let mut rest: Vec<io::IoSlice<'_>> = Vec::with_capacity(plain.len());
        for s in plain {
            if first >= s.len() {
                first -= s.len();
                continue;
            }
            rest.push(io::IoSlice::new(&s[first..]));
            first = 0;
        }
        let n = tls.writer().write_vectored(&rest)?;
        if n == 0 {
            break;
        }
        taken += n;
        skip = taken;
    }
    Ok(taken)
}

/// Decrypts `data` (ciphertext read from the socket) and hands each run of plaintext to `f`,
/// through `plain` as scratch space. Ciphertext ending inside a record stays in rustls for the
/// next call. Returns `true` once the server sent `close_notify`.
///
/// # Errors
///
/// A TLS error (bad record, alert, failed verification), or what `f` returns.
pub fn decrypt(
    tls: &mut ClientConnection,
    mut data: &[u8],
    plain: &mut [u8],
    mut f: impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<bool, String> {
    while !data.is_empty() {
        // rustls takes at most about 4 KiB per call from a slice.
        tls.read_tls(&mut data).map_err(|e| format!("TLS: {e}"))?;
        let state = tls.process_new_packets().map_err(|e| format!("TLS: {e}"))?;
        loop {
            match tls.reader().read(plain) {
                Ok(0) => return Ok(true),
                Ok(n) => f(&plain[..n])?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(format!("TLS: {e}")),
            }
        }
        if state.peer_has_closed() {
            return Ok(true);
        }
    }
    Ok(false)
}
