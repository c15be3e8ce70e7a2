//! Certificates made in the test with openssl: a CA, a server certificate for `localhost` and
//! 127.0.0.1, and a client certificate, laid out as qemu's `tls-creds-x509` and nbdkit's
//! `--tls-certificates` want them (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, …).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{require_tool, run_ok, tempdir};

pub struct Certs {
    pub dir: tempfile::TempDir,
}

impl Certs {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn ca(&self) -> PathBuf {
        self.path("ca-cert.pem")
    }

    pub fn client_cert(&self) -> PathBuf {
        self.path("client-cert.pem")
    }

    pub fn client_key(&self) -> PathBuf {
        self.path("client-key.pem")
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    run_ok(Command::new("openssl").current_dir(dir).args(args));
}

/// A CA named `ca_name`, and a server and a client certificate it signed (EC P-256 keys).
pub fn make_certs(ca_name: &str) -> Certs {
    require_tool("openssl", "openssl");
    let certs = Certs { dir: tempdir() };
    let dir = certs.dir.path();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let subject = format!("/CN={ca_name}");
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-days",
        "2",
        "-subj",
        &subject,
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &ca);
    for (who, cn, ext) in [
        (
            "server",
            "localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n",
        ),
        (
            "client",
            "lunmpio-client",
            "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n",
        ),
    ] {
        std::fs::write(dir.join(format!("{who}.ext")), ext).expect("write ext");
        let key = format!("{who}-key.pem");
        let csr = format!("{who}.csr");
        let subj = format!("/CN={cn}");
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &req);
        let ext = format!("{who}.ext");
        let cert = format!("{who}-cert.pem");
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
    certs
}
