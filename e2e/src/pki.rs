//! The control plane's keys and certificates: a CA, the API server's serving certificate, an
//! admin client certificate (O=system:masters) and the service-account signing key. All are
//! ECDSA P-256, generated fresh for every control plane.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::{Error, Result};

/// PEM files written for one control plane, and what clients need in memory.
pub(crate) struct Pki {
    pub ca_crt: PathBuf,
    pub serving_crt: PathBuf,
    pub serving_key: PathBuf,
    /// The service-account signing key (private, PKCS#8) and its public key (the API server
    /// reads no public key out of a PKCS#8 private key file).
    pub sa_key: PathBuf,
    pub sa_pub: PathBuf,
    pub ca_pem: String,
    pub ca_der: Vec<u8>,
    pub admin_crt_pem: String,
    pub admin_key_pem: String,
}

impl Pki {
    pub(crate) fn generate(dir: &Path) -> Result<Pki> {
        fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;

        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "localmodel-e2e-ca");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca = Issuer::new(ca_params, ca_key);

        let serving_key = KeyPair::generate()?;
        let mut serving = CertificateParams::new(vec![
            "127.0.0.1".to_string(),
            "localhost".to_string(),
            "kubernetes".to_string(),
            "kubernetes.default".to_string(),
            "kubernetes.default.svc".to_string(),
        ])?;
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_cert = serving.signed_by(&serving_key, &ca)?;

        let admin_key = KeyPair::generate()?;
        let mut admin = CertificateParams::new(Vec::<String>::new())?;
        admin.distinguished_name.push(DnType::CommonName, "admin");
        admin
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        admin.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin_cert = admin.signed_by(&admin_key, &ca)?;

        let sa_key = KeyPair::generate()?;

        let write = |name: &str, contents: &str| -> Result<PathBuf> {
            let path = dir.join(name);
            fs::write(&path, contents)
                .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
            Ok(path)
        };
        // For curl and openssl; clients take them from the kubeconfig.
        write("admin.crt", &admin_cert.pem())?;
        write("admin.key", &admin_key.serialize_pem())?;
        let pki = Pki {
            ca_crt: write("ca.crt", &ca_cert.pem())?,
            serving_crt: write("apiserver.crt", &serving_cert.pem())?,
            serving_key: write("apiserver.key", &serving_key.serialize_pem())?,
            sa_key: write("service-account.key", &sa_key.serialize_pem())?,
            sa_pub: write("service-account.pub", &sa_key.public_key_pem())?,
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().to_vec(),
            admin_crt_pem: admin_cert.pem(),
            admin_key_pem: admin_key.serialize_pem(),
        };
        Ok(pki)
    }
}
