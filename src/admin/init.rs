//! `openclaw-admin init`: a new installation with safe settings from the
//! start. A fleet CA (`rcgen`, ECDSA P-256), the embedded broker's
//! certificate for the names devices connect to, a client certificate and a
//! broker identity per device, the first admin token, and the configs that
//! use them: the server with API tokens required and the broker on mutual
//! TLS with logins required; each agent with its password, certificate and
//! the CA.

use crate::server::auth::tokens::{AuditEntry, Role};
use crate::server::auth::{AuthError, TokenStore};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// Errors of `init`.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{} already holds an installation ({}); pick another --out or remove it", dir.display(), what.display())]
    Exists { dir: PathBuf, what: PathBuf },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("{0}")]
    Invalid(String),
}

/// What `init` is asked for.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Everything goes under here.
    pub out: PathBuf,
    /// The local models folder (gets a README, as the starter's).
    pub model_path: PathBuf,
    /// Names (DNS or IP) devices reach the server by: the broker's
    /// certificate is for these, and the agents' configs use the first.
    pub hosts: Vec<String>,
    /// Device ids to make identities and agent configs for.
    pub devices: Vec<String>,
    pub http_port: u16,
    pub mqtt_port: u16,
    /// Where each device's bundle (`agents/ID/`) will be on the device: its
    /// `agent.toml` names its files there. None: where init writes them.
    pub device_dir: Option<PathBuf>,
}

/// What `init` made.
#[derive(Debug, Clone)]
pub struct Initialized {
    /// `OUT/server.toml`.
    pub server_config: PathBuf,
    /// The server's data dir (`OUT/data`), with `auth.db`.
    pub data_dir: PathBuf,
    /// The admin token (`oc_...`), also in `OUT/admin.token` (0600).
    pub admin_token: String,
    /// `OUT/agents/ID/agent.toml`, per device.
    pub agents: Vec<(String, PathBuf)>,
    /// `OUT/pki/ca.pem`.
    pub ca: PathBuf,
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), InitError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| InitError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// The civil (proleptic Gregorian, UTC) date of `days` since 1970-01-01
/// (Howard Hinnant's `civil_from_days`): no date crate needed for it.
fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = (yoe + era * 400 + i64::from(m <= 2)) as i32;
    (y, m, d)
}

/// A certificate's validity, made `now_s` (seconds since 1970): from the
/// day before (a device whose clock is a little behind still accepts it)
/// for `years` whole years. (An average-length year, as before, put the
/// start on January 1st of the *next* year in the last hours of most years,
/// and gave certificates made in December barely a year.)
fn validity(now_s: u64, years: i32) -> ((i32, u8, u8), (i32, u8, u8)) {
    let (y, m, d) = civil_from_days((now_s / 86_400) as i64 - 1);
    // February 29th has no twin in most years.
    let end_day = if (m, d) == (2, 29) { 28 } else { d };
    ((y, m, d), (y + years, m, end_day))
}

fn params(names: Vec<String>, cn: &str, years: i32) -> Result<CertificateParams, InitError> {
    let mut p = CertificateParams::new(names)?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name
        .push(DnType::OrganizationName, "OpenClaw fleet");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let ((y0, m0, d0), (y1, m1, d1)) = validity(now, years);
    p.not_before = rcgen::date_time_ymd(y0, m0, d0);
    p.not_after = rcgen::date_time_ymd(y1, m1, d1);
    Ok(p)
}

/// Whether `host` can go into the broker's certificate and an agent's
/// `mqtts://HOST:PORT` as it is: an IP address, or a DNS name of letters,
/// digits, `-`, `_` and `.` (a leading `*.` for a wildcard).
fn valid_host(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        })
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Makes the installation under `opts.out` (which must not hold one).
pub fn init(opts: &InitOptions) -> Result<Initialized, InitError> {
    if opts.hosts.is_empty() {
        return Err(InitError::Invalid(
            "--host: at least one name or address devices reach the server by".into(),
        ));
    }
    // `[::1]` as written in a URL is the address `::1`.
    let hosts: Vec<String> = opts
        .hosts
        .iter()
        .map(
            |h| match h.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
                Some(ip) if ip.parse::<std::net::Ipv6Addr>().is_ok() => ip.to_string(),
                _ => h.clone(),
            },
        )
        .collect();
    for h in &hosts {
        if !valid_host(h) {
            return Err(InitError::Invalid(format!(
                "--host {h:?} is not a host name or IP address"
            )));
        }
    }
    // Written into each agent.toml, in a comment too: no line breaks.
    if let Some(d) = &opts.device_dir {
        if d.to_string_lossy().chars().any(char::is_control) {
            return Err(InitError::Invalid(format!(
                "--device-dir {d:?} holds a control character"
            )));
        }
    }
    for d in &opts.devices {
        if !crate::protocol::topics::valid_device_id(d) {
            return Err(InitError::Invalid(format!(
                "--device {d:?} is not a valid device id (letters, digits, - _ . up to 64)"
            )));
        }
        // Each is a folder under agents/: `..` put its key and config in
        // the installation's own folder.
        if d == "." || d == ".." {
            return Err(InitError::Invalid(format!(
                "--device {d:?} cannot name a folder under agents/"
            )));
        }
    }
    let out = &opts.out;
    for what in ["server.toml", "pki", "data"] {
        let p = out.join(what);
        if p.exists() {
            return Err(InitError::Exists {
                dir: out.clone(),
                what: p,
            });
        }
    }
    std::fs::create_dir_all(out).map_err(|source| InitError::Io {
        path: out.clone(),
        source,
    })?;
    let out = std::fs::canonicalize(out).map_err(|source| InitError::Io {
        path: out.clone(),
        source,
    })?;
    let pki = out.join("pki");

    // The fleet CA: signs the broker's and the devices' certificates.
    let ca_key = KeyPair::generate()?;
    let mut ca_params = params(Vec::new(), "OpenClaw fleet CA", 10)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca_params.self_signed(&ca_key)?;
    let ca_pem = pki.join("ca.pem");
    write(&ca_pem, &ca.pem(), 0o644)?;
    write(&pki.join("ca.key"), &ca_key.serialize_pem(), 0o600)?;

    let leaf = |names: Vec<String>, cn: &str, eku: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate()?;
        let mut p = params(names, cn, 2)?;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![eku];
        let cert = p.signed_by(&key, &ca, &ca_key)?;
        Ok::<_, InitError>((cert.pem(), key.serialize_pem()))
    };
    let (broker_cert, broker_key) = leaf(
        hosts.clone(),
        &hosts[0],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (bc, bk) = (pki.join("broker.pem"), pki.join("broker.key"));
    write(&bc, &broker_cert, 0o644)?;
    write(&bk, &broker_key, 0o600)?;

    // The server's data dir: auth.db (token and password hashes), and later
    // every task's input and result; only for its owner.
    let data_dir = out.join("data");
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&data_dir)
            .map_err(|source| InitError::Io {
                path: data_dir.clone(),
                source,
            })?;
    }
    let mut store = TokenStore::open(&data_dir)?;
    let token = store.create_audited(Role::Admin, "init", None, |i| {
        AuditEntry::offline("token.create", &i.id)
    })?;
    write(
        &out.join("admin.token"),
        &format!("{}\n", token.token),
        0o600,
    )?;

    let server_config = out.join("server.toml");
    write(
        &server_config,
        &format!(
            "# Written by openclaw-admin init: API tokens required (admin.token is the\n\
             # first), the embedded broker on mutual TLS with device logins required.\n\
             [http]\nhost = \"0.0.0.0\"\nport = {http}\nauth = \"required\"\n\n\
             [mqtt]\nhost = \"0.0.0.0\"\nport = {mqtt}\nauth = \"required\"\n\n\
             [mqtt.listen_tls]\ncert_file = {bc}\nkey_file = {bk}\nclient_ca_file = {ca}\n\n\
             [storage]\ndata_dir = {data}\n",
            http = opts.http_port,
            mqtt = opts.mqtt_port,
            bc = toml_str(&bc.display().to_string()),
            bk = toml_str(&bk.display().to_string()),
            ca = toml_str(&ca_pem.display().to_string()),
            data = toml_str(&data_dir.display().to_string()),
        ),
        0o600,
    )?;

    let mut agents = Vec::new();
    for id in &opts.devices {
        let bundle = out.join("agents").join(id);
        let (cert, key) = leaf(vec![id.clone()], id, ExtendedKeyUsagePurpose::ClientAuth)?;
        write(&bundle.join("client.pem"), &cert, 0o644)?;
        write(&bundle.join("client.key"), &key, 0o600)?;
        write(&bundle.join("ca.pem"), &ca.pem(), 0o644)?;
        let there = opts.device_dir.clone().unwrap_or(bundle.clone());
        let n = store.device_add(id, false, false)?;
        let file = |f: &str| toml_str(&there.join(f).display().to_string());
        let agent_toml = bundle.join("agent.toml");
        write(
            &agent_toml,
            &format!(
                "# Written by openclaw-admin init for device {id}: copy this directory to\n\
                 # {there} on the device. Its password is not kept anywhere else.\n\
                 id = {idq}\n\n[mqtt]\nbroker = {url}\npassword = {pass}\n\n\
                 [mqtt.tls]\nca_file = {ca}\nclient_cert_file = {cert}\nclient_key_file = {key}\n",
                there = there.display(),
                idq = toml_str(id),
                url = toml_str(&match hosts[0].parse::<std::net::Ipv6Addr>() {
                    Ok(ip) => format!("mqtts://[{ip}]:{}", opts.mqtt_port),
                    Err(_) => format!("mqtts://{}:{}", hosts[0], opts.mqtt_port),
                }),
                pass = toml_str(&n.password),
                ca = file("ca.pem"),
                cert = file("client.pem"),
                key = file("client.key"),
            ),
            0o600,
        )?;
        agents.push((id.clone(), agent_toml));
    }
    super::write_models_readme(&opts.model_path).map_err(|e| InitError::Invalid(e.to_string()))?;
    Ok(Initialized {
        server_config,
        data_dir,
        admin_token: token.token,
        agents,
        ca: ca_pem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_match_known_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        // 2024-02-29, 2026-12-31, 2027-01-01.
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(20_818), (2026, 12, 31));
        assert_eq!(civil_from_days(20_819), (2027, 1, 1));
    }

    /// Late on December 31st the certificates were dated from January 1st
    /// of the next year (not yet valid for hours); made in December they
    /// lasted barely a year.
    #[test]
    fn validity_starts_before_now_and_lasts_whole_years() {
        // 2026-12-31 20:00 UTC.
        let now = 1_798_761_600 - 4 * 3600;
        assert_eq!(validity(now, 2), ((2026, 12, 30), (2028, 12, 30)));
        // 2024-03-01 00:30 UTC: the day before is February 29th.
        assert_eq!(validity(1_709_253_000, 1), ((2024, 2, 29), (2025, 2, 28)));
    }

    #[test]
    fn devices_named_dot_or_dot_dot_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for id in [".", ".."] {
            let e = init(&InitOptions {
                out: dir.path().join("site"),
                model_path: dir.path().join("models"),
                hosts: vec!["localhost".into()],
                devices: vec![id.into()],
                http_port: 0,
                mqtt_port: 0,
                device_dir: None,
            })
            .unwrap_err();
            assert!(matches!(e, InitError::Invalid(_)), "{id}: {e}");
        }
        assert!(!dir.path().join("site").join("client.key").exists());
    }

    #[test]
    fn hosts_are_names_or_addresses() {
        for ok in [
            "localhost",
            "10.0.0.5",
            "::1",
            "gw.example.com",
            "*.fleet.lan",
            "pi_1",
        ] {
            assert!(valid_host(ok), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "a\nb",
            "a\"b",
            "evil.com:1883",
            "a/b",
            "[::1]",
            "a..b",
            ".",
            "a#b",
            "x@y",
        ] {
            assert!(!valid_host(bad), "{bad:?}");
        }
    }
}
