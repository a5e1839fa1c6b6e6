//! Certificates for tier-2 TLS nodes, made with openssl as a user makes them: a CA, and a server
//! certificate in the layout of a cert-manager Secret (`tls.crt`, `tls.key`, `ca.crt`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
    assert!(out.status.success(), "openssl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// A CA in `dir` (`ca.key`, `ca.crt`), its subject `name`.
pub fn ca(dir: &Path, name: &str) -> PathBuf {
    std::fs::create_dir_all(dir).expect("CA dir");
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        dir,
    );
    dir.join("ca.crt")
}

/// A server certificate signed by the CA in `ca_dir`, for these DNS names and IP addresses,
/// written to `dir` as `tls.crt`, `tls.key` and `ca.crt`.
pub fn server(dir: &Path, ca_dir: &Path, dns: &[String], ips: &[String]) {
    std::fs::create_dir_all(dir).expect("TLS dir");
    let names: Vec<String> =
        dns.iter().map(|d| format!("DNS:{d}")).chain(ips.iter().map(|ip| format!("IP:{ip}"))).collect();
    let extensions = format!(
        "subjectAltName={}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth,clientAuth\n",
        names.join(",")
    );
    std::fs::write(dir.join("extensions.cnf"), extensions).expect("extensions");
    let (ca_crt, ca_key) = (ca_dir.join("ca.crt"), ca_dir.join("ca.key"));
    openssl(
        &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=rabbitmq"],
        dir,
    );
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "tls.csr",
            "-CA",
            &ca_crt.to_string_lossy(),
            "-CAkey",
            &ca_key.to_string_lossy(),
            "-CAcreateserial",
            "-out",
            "tls.crt",
            "-days",
            "2",
            "-extfile",
            "extensions.cnf",
        ],
        dir,
    );
    std::fs::copy(&ca_crt, dir.join("ca.crt")).expect("ca.crt");
    // The node reads its key as the user it runs as.
    let mut permissions = std::fs::metadata(dir.join("tls.key")).expect("tls.key").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o644);
    std::fs::set_permissions(dir.join("tls.key"), permissions).expect("chmod tls.key");
}
