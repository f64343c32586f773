//! The HTTP server as a browser, a script and Prometheus meet it: public and
//! protected routes, administrator login with sessions and CSRF, named API
//! tokens, the OpenAPI document against the routes, `/metrics`, and HTTPS.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use baton_test_support::{Manager, manager::BOUND, wait_for};
use serde_json::{Value, json};

/// A plain HTTP client that neither follows redirects nor keeps cookies.
fn client() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(BOUND))
        .build()
        .into()
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// The value of cookie `name` from this answer's `Set-Cookie` headers.
    fn cookie(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
            .filter_map(|(_, v)| v.split(';').next()?.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

fn request(
    m: &Manager,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, String)>,
) -> Answer {
    try_request(m, method, path, headers, body).expect("request")
}

/// [`request`], or the error that kept it from an answer (a connection the server closed).
fn try_request(
    m: &Manager,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, String)>,
) -> Result<Answer, ureq::Error> {
    let url = m.url(path);
    let agent = client();
    let mut req = ureq::http::Request::builder().method(method).uri(&url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = match body {
        Some((kind, text)) => agent.run(req.header("content-type", kind).body(text).unwrap())?,
        None => agent.run(req.body(()).unwrap())?,
    };
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = resp.into_body().read_to_string().unwrap_or_default();
    Ok(Answer {
        status,
        headers,
        body,
    })
}

/// `GET path` with these headers.
fn get(m: &Manager, path: &str, headers: &[(&str, &str)]) -> Answer {
    request(m, "GET", path, headers, None)
}

fn add_admin(m: &Manager, name: &str, password: &str) {
    let file = m.dir.join(format!("{name}.password"));
    std::fs::write(&file, format!("{password}\n")).unwrap();
    let out = baton(
        &[
            "admin",
            "add",
            name,
            "--password-file",
            file.to_str().unwrap(),
            "--data-dir",
            m.data_dir().to_str().unwrap(),
        ],
        BOUND,
    );
    assert!(out.success, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("added"), "{}", out.stdout);
}

/// Logs in through the form; returns the session cookie and the page's CSRF token.
fn login(m: &Manager, name: &str, password: &str) -> (String, String) {
    let page = get(m, "/", &[]);
    let form_csrf = page.cookie("baton_login_csrf").expect("login CSRF cookie");
    assert!(page.body.contains(&format!("value=\"{form_csrf}\"")));
    let cookie = format!("baton_login_csrf={form_csrf}");
    let body = format!("name={name}&password={password}&csrf={form_csrf}");
    let answer = request(
        m,
        "POST",
        "/login",
        &[("cookie", &cookie)],
        Some(("application/x-www-form-urlencoded", body)),
    );
    assert_eq!(answer.status, 303, "{}", answer.body);
    let set = answer
        .headers
        .iter()
        .find(|(k, v)| k == "set-cookie" && v.starts_with("baton_session="))
        .map(|(_, v)| v.clone())
        .expect("session cookie");
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    assert!(
        !set.contains("Secure"),
        "plain HTTP: no Secure flag ({set})"
    );
    let session = answer.cookie("baton_session").unwrap();
    let app = get(m, "/", &[("cookie", &format!("baton_session={session}"))]);
    assert_eq!(app.status, 200);
    let csrf = app
        .body
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("CSRF token in the application page")
        .to_string();
    (session, csrf)
}

#[test]
fn must_show_openapi_login_page_and_401() {
    let m = Manager::start(BATON);
    // The OpenAPI document is public and lists agents, segments, groups, policies and jobs.
    let doc = get(&m, "/api/v1/openapi.json", &[]);
    assert_eq!(doc.status, 200);
    let doc = doc.json();
    let paths: Vec<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for want in [
        "/api/v1/agents",
        "/api/v1/segments",
        "/api/v1/groups",
        "/api/v1/policies",
        "/api/v1/jobs",
    ] {
        assert!(paths.contains(&want), "{want} not in {paths:?}");
    }
    // `/` is the login page itself: HTML with a password field, no redirect.
    let page = get(&m, "/", &[]);
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-type")
            .unwrap()
            .starts_with("text/html")
    );
    assert!(page.body.contains("type=\"password\""), "{}", page.body);
    assert!(page.body.contains("action=\"/login\""));
    // Without credentials the API answers 401, and nothing else.
    for path in [
        "/api/v1/agents",
        "/api/v1/jobs/1",
        "/api/v1/nowhere",
        "/metrics",
    ] {
        let a = get(&m, path, &[]);
        assert_eq!(a.status, 401, "{path}: {}", a.body);
        assert!(!a.body.contains("agent"), "{path} leaks: {}", a.body);
    }
    let a = get(&m, "/static/style.css", &[]);
    assert_eq!(a.status, 200);
    assert!(a.header("content-type").unwrap().starts_with("text/css"));
}

#[test]
fn every_documented_route_is_served() {
    let m = Manager::start(BATON);
    let doc = get(&m, "/api/v1/openapi.json", &[]).json();
    let auth = format!("Bearer {}", m.info.admin_token);
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in ["get", "post", "put", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            let concrete = path.replace("{id}", "999").replace("{name}", "nothing");
            let a = if method == "get" && concrete.ends_with("/events") {
                // A stream of a job that does not exist ends at once with 404.
                get(&m, &concrete, &[("authorization", &auth)])
            } else {
                request(
                    &m,
                    &method.to_uppercase(),
                    &concrete,
                    &[("authorization", &auth)],
                    (method != "get").then(|| ("application/json", "{}".to_string())),
                )
            };
            assert!(
                !(a.status == 404 && a.body.contains("no such route")),
                "{method} {path} is documented but not routed"
            );
            assert_ne!(a.status, 405, "{method} {path}: {}", a.body);
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} operations documented");
    let a = get(&m, "/api/v1/undocumented", &[("authorization", &auth)]);
    assert_eq!(a.status, 404);
}

#[test]
fn sessions_csrf_and_api_tokens() {
    let m = Manager::start(BATON);
    add_admin(&m, "ops", "correct-horse");
    // Wrong password: the login page again, 401, no session.
    let page = get(&m, "/", &[]);
    let form_csrf = page.cookie("baton_login_csrf").unwrap();
    let wrong = request(
        &m,
        "POST",
        "/login",
        &[("cookie", &format!("baton_login_csrf={form_csrf}"))],
        Some((
            "application/x-www-form-urlencoded",
            format!("name=ops&password=nope-nope&csrf={form_csrf}"),
        )),
    );
    assert_eq!(wrong.status, 401);
    assert!(wrong.body.contains("Wrong name or password"));
    assert!(wrong.cookie("baton_session").is_none());
    // A login without the form's CSRF cookie is refused.
    let forged = request(
        &m,
        "POST",
        "/login",
        &[],
        Some((
            "application/x-www-form-urlencoded",
            "name=ops&password=correct-horse&csrf=abc".into(),
        )),
    );
    assert_eq!(forged.status, 403);
    assert!(forged.cookie("baton_session").is_none());

    let (session, csrf) = login(&m, "ops", "correct-horse");
    let cookie = format!("baton_session={session}");
    let a = get(&m, "/api/v1/agents", &[("cookie", &cookie)]);
    assert_eq!(a.status, 200, "{}", a.body);
    // Changes need the CSRF header with a session.
    let body = || {
        Some((
            "application/json",
            json!({"name": "edge", "selector": {"role": "edge"}}).to_string(),
        ))
    };
    let a = request(&m, "POST", "/api/v1/groups", &[("cookie", &cookie)], body());
    assert_eq!(a.status, 403, "{}", a.body);
    let a = request(
        &m,
        "POST",
        "/api/v1/groups",
        &[("cookie", &cookie), ("x-csrf-token", "0000")],
        body(),
    );
    assert_eq!(a.status, 403);
    let a = request(
        &m,
        "POST",
        "/api/v1/groups",
        &[("cookie", &cookie), ("x-csrf-token", &csrf)],
        body(),
    );
    assert_eq!(a.status, 201, "{}", a.body);
    // Validation errors name the field.
    let a = request(
        &m,
        "POST",
        "/api/v1/groups",
        &[("cookie", &cookie), ("x-csrf-token", &csrf)],
        Some((
            "application/json",
            json!({"name": "bad name", "selector": {"a": "b"}}).to_string(),
        )),
    );
    assert_eq!(a.status, 400);
    assert_eq!(a.json()["field"], "name", "{}", a.body);
    // /metrics with a session.
    let metrics = get(&m, "/metrics", &[("cookie", &cookie)]);
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.body.contains("baton_connected_agents 0"),
        "{}",
        metrics.body
    );
    assert!(metrics.body.contains("baton_jobs{state=\"running\"} 0"));
    assert!(
        metrics
            .body
            .contains("baton_served_bytes_total{source=\"relays\"} 0")
    );
    assert!(
        metrics
            .body
            .contains("baton_chunk_verification_failures_total 0")
    );
    // Logout needs the CSRF token too, then the cookie is worthless.
    let a = request(
        &m,
        "POST",
        "/logout",
        &[("cookie", &cookie)],
        Some(("application/x-www-form-urlencoded", "csrf=wrong".into())),
    );
    assert_eq!(a.status, 403);
    let a = request(
        &m,
        "POST",
        "/logout",
        &[("cookie", &cookie)],
        Some(("application/x-www-form-urlencoded", format!("csrf={csrf}"))),
    );
    assert_eq!(a.status, 303);
    let a = get(&m, "/api/v1/agents", &[("cookie", &cookie)]);
    assert_eq!(a.status, 401);
    let page = get(&m, "/", &[("cookie", &cookie)]);
    assert!(page.body.contains("type=\"password\""));

    // Named API tokens work as bearer tokens until revoked.
    let data = m.data_dir();
    let out = baton(
        &["admin", "token", "ci", "--data-dir", data.to_str().unwrap()],
        BOUND,
    );
    assert!(out.success, "{}", out.stderr);
    let token = out.stdout.trim().to_string();
    let bearer = format!("Bearer {token}");
    let a = get(&m, "/api/v1/jobs", &[("authorization", &bearer)]);
    assert_eq!(a.status, 200);
    let a = request(
        &m,
        "POST",
        "/api/v1/enrolment-tokens",
        &[("authorization", &bearer)],
        None,
    );
    assert_eq!(
        a.status, 201,
        "bearer tokens need no CSRF token: {}",
        a.body
    );
    let out = baton(
        &[
            "admin",
            "revoke-token",
            "ci",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        BOUND,
    );
    assert!(out.success);
    let a = get(&m, "/api/v1/jobs", &[("authorization", &bearer)]);
    assert_eq!(a.status, 401);
}

#[test]
fn uploads_become_jobs() {
    let m = Manager::start(BATON);
    let auth = format!("Bearer {}", m.info.admin_token);
    let a = request(
        &m,
        "POST",
        "/api/v1/uploads?name=fw-1.bin",
        &[("authorization", &auth)],
        Some(("application/octet-stream", "x".repeat(100_000))),
    );
    assert_eq!(a.status, 201, "{}", a.body);
    let up = a.json();
    assert_eq!(up["length"], 100_000);
    let path = up["path"].as_str().unwrap();
    assert!(path.starts_with(m.data_dir().join("uploads").to_str().unwrap()));
    assert_eq!(std::fs::read(path).unwrap().len(), 100_000);
    // Uploaded content is the owner's only, in an owner-only directory.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(std::path::Path::new(path)), 0o600);
    assert_eq!(mode(&m.data_dir().join("uploads")), 0o700);
    let key = baton_protocol::identity::Identity::from_seed([7; 32]).public();
    m.enrol("e1", &key);
    let (status, job) = m.api(
        "POST",
        "/api/v1/jobs",
        Some(json!({"path": path, "name": "fw", "targets": {"agents": ["e1"]}})),
    );
    assert_eq!(status, 201, "{job}");
    assert_eq!(job["length"], 100_000);
    let a = request(
        &m,
        "POST",
        "/api/v1/uploads?name=empty",
        &[("authorization", &auth)],
        Some(("application/octet-stream", String::new())),
    );
    assert_eq!(a.status, 400);
}

/// Writes a self-signed certificate for 127.0.0.1 and its key with the openssl command.
fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
        ])
        .args([
            "-subj",
            "/CN=baton-test",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "extendedKeyUsage=serverAuth",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("the openssl command is needed for this test");
    assert!(status.success(), "openssl could not make a certificate");
    (cert, key)
}

#[test]
fn https_with_a_self_signed_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(tmp.path());
    let ready = tmp.path().join("ready.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["serve", "--data-dir"])
        .arg(tmp.path().join("data"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--tls-cert",
        ])
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .arg("--ready-file")
        .arg(&ready)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let deadline = Instant::now() + BOUND;
    let info: Value = loop {
        if let Ok(b) = std::fs::read(&ready) {
            break serde_json::from_slice(&b).unwrap();
        }
        assert!(child.try_wait().unwrap().is_none(), "serve exited");
        assert!(Instant::now() < deadline, "no ready file");
        std::thread::sleep(Duration::from_millis(20));
    };
    let _guard = Kill(child);
    let addr: std::net::SocketAddr = info["http_addr"].as_str().unwrap().parse().unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (status_line, body, set_cookie) = rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio_rustls::rustls;
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(&cert).unwrap();
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(&pem).unwrap();
        roots.add(der).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
        tls.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(BOUND, tls.read_to_end(&mut out))
            .await
            .unwrap()
            .ok();
        let text = String::from_utf8_lossy(&out).into_owned();
        let status_line = text.lines().next().unwrap_or("").to_string();
        let set_cookie = text
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
            .unwrap_or("")
            .to_string();
        (status_line, text, set_cookie)
    });
    assert!(status_line.starts_with("HTTP/1.1 200"), "{status_line}");
    assert!(body.contains("type=\"password\""));
    assert!(
        set_cookie.contains("Secure"),
        "cookies are Secure over HTTPS: {set_cookie}"
    );
    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let plain = client().get(format!("http://{addr}/")).call();
    assert!(
        plain.is_err() || plain.unwrap().status().as_u16() != 200,
        "plain HTTP must not be served"
    );

    // The CLI on this host: the data directory says https and which certificate to trust.
    let cli = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_baton"))
            .arg("agents")
            .arg("--data-dir")
            .arg(tmp.path().join("data"))
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = cli(&[]);
    assert!(
        out.status.success(),
        "baton agents over https: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Another certificate to trust: the handshake fails and says why.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let (other_cert, _) = self_signed(&other);
    let url = format!("https://{addr}");
    let out = cli(&[
        "--manager-url",
        &url,
        "--ca-cert",
        other_cert.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("cannot reach manager"), "{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // A file without certificates is refused before any connection.
    let out = cli(&["--manager-url", &url, "--ca-cert", "/dev/null"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no PEM certificate"), "{err}");
}

/// One login through the form with a fresh form token; the answer as it comes.
fn try_login(m: &Manager, name: &str, password: &str) -> Answer {
    let page = get(m, "/", &[]);
    let form_csrf = page.cookie("baton_login_csrf").expect("login CSRF cookie");
    request(
        m,
        "POST",
        "/login",
        &[("cookie", &format!("baton_login_csrf={form_csrf}"))],
        Some((
            "application/x-www-form-urlencoded",
            format!("name={name}&password={password}&csrf={form_csrf}"),
        )),
    )
}

#[test]
fn failed_logins_back_off() {
    let m = Manager::start(BATON);
    add_admin(&m, "ops", "correct-horse-battery");
    for i in 0..4 {
        let a = try_login(&m, "ops", "wrong");
        assert_eq!(a.status, 401, "failure {i}: {}", a.body);
        assert!(a.body.contains("Wrong name or password"));
    }
    // The fifth failure locks the name (and counts against the address).
    let a = try_login(&m, "ops", "wrong");
    assert_eq!(a.status, 429, "{}", a.body);
    assert_eq!(a.header("retry-after"), Some("1"));
    assert!(a.body.contains("Too many failed logins"), "{}", a.body);
    assert!(a.body.contains("type=\"password\""), "still the login form");
    // While locked, even the right password is not checked.
    let locked_at = Instant::now();
    let a = try_login(&m, "OPS", "correct-horse-battery");
    assert_eq!(a.status, 429, "{}", a.body);
    assert!(a.header("retry-after").is_some());
    // The lock lifts after Retry-After; the right password then logs in and clears the count.
    let ok = wait_for(
        "login after the back-off",
        Duration::from_secs(10),
        String::new,
        || {
            let a = try_login(&m, "ops", "correct-horse-battery");
            (a.status != 429).then_some(a)
        },
    );
    assert_eq!(ok.status, 303, "{}", ok.body);
    assert!(locked_at.elapsed() >= Duration::from_millis(500));
    assert!(ok.cookie("baton_session").is_some());
    // Failures then lock the address too: other names from here, past 10 address failures.
    // (The successful login cleared both counts.)
    let mut statuses = Vec::new();
    for i in 0..10 {
        statuses.push(try_login(&m, &format!("nobody{i}"), "x").status);
    }
    assert_eq!(&statuses[..9], &[401; 9], "{statuses:?}");
    assert_eq!(statuses[9], 429, "{statuses:?}");
    let a = try_login(&m, "someone-else", "x");
    assert_eq!(a.status, 429, "the address is locked for every name");
}

#[test]
fn uploads_are_capped_and_leave_nothing_when_refused_or_broken() {
    let m = Manager::start_args(BATON, &["--give-up", "5", "--max-upload", "64KiB"]);
    let auth = format!("Bearer {}", m.info.admin_token);
    let uploads = m.data_dir().join("uploads");
    let files = || -> Vec<String> {
        std::fs::read_dir(&uploads)
            .map(|d| {
                d.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                    .collect()
            })
            .unwrap_or_default()
    };
    // At the cap: stored.
    let a = request(
        &m,
        "POST",
        "/api/v1/uploads?name=fits.bin",
        &[("authorization", &auth)],
        Some(("application/octet-stream", "x".repeat(64 * 1024))),
    );
    assert_eq!(a.status, 201, "{}", a.body);
    assert_eq!(files().len(), 1, "{:?}", files());
    // Over the cap, declared in Content-Length: 413 before anything is written.
    let a = request(
        &m,
        "POST",
        "/api/v1/uploads?name=big.bin",
        &[("authorization", &auth)],
        Some(("application/octet-stream", "x".repeat(64 * 1024 + 1))),
    );
    assert_eq!(a.status, 413, "{}", a.body);
    assert_eq!(a.json()["max_bytes"], 65536, "{}", a.body);
    assert!(a.json()["error"].as_str().unwrap().contains("--max-upload"));
    assert_eq!(files().len(), 1, "{:?}", files());

    // Over the cap without a length (chunked): refused midway, the part file removed.
    let raw = |head: &str, body: &[u8]| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(m.info.http_addr.as_str()).unwrap();
        s.set_read_timeout(Some(BOUND)).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    };
    let mut chunked = Vec::new();
    for _ in 0..5 {
        chunked.extend_from_slice(format!("{:x}\r\n", 20_000).as_bytes());
        chunked.extend_from_slice(&[b'y'; 20_000]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let answer = raw(
        &format!(
            "POST /api/v1/uploads?name=chunked.bin HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        ),
        &chunked,
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(files().len(), 1, "{:?}", files());

    // A client that goes away midway: the handler is dropped and so is the part file.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(m.info.http_addr.as_str()).unwrap();
        s.write_all(
            format!(
                "POST /api/v1/uploads?name=broken.bin HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\
                 Content-Length: 60000\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
        s.write_all(&[b'z'; 30_000]).unwrap();
        wait_for(
            "the upload's part file",
            BOUND,
            || format!("{:?}", files()),
            || files().iter().any(|f| f.ends_with(".part")).then_some(()),
        );
    }
    wait_for(
        "the broken upload's part file removed",
        BOUND,
        || format!("{:?}", files()),
        || (files().len() == 1).then_some(()),
    );
    assert!(files()[0].ends_with("fits.bin"), "{:?}", files());
}

#[test]
fn silent_and_idle_http_connections_are_closed() {
    use std::io::{Read as _, Write as _};
    let m = Manager::start_args(BATON, &["--http-header-timeout", "2"]);
    add_admin(&m, "ops", "correct-horse-battery");
    let http_addr: std::net::SocketAddr = m.info.http_addr.parse().expect("http address");
    let closed_within = |s: &mut std::net::TcpStream, bound: Duration| {
        s.set_read_timeout(Some(bound)).unwrap();
        let mut got = Vec::new();
        // EOF (Ok) within the bound; a read timeout means the connection was left open.
        s.read_to_end(&mut got).map(|_| got)
    };
    let start = Instant::now();
    let mut silent = std::net::TcpStream::connect(http_addr).unwrap();
    let mut slow = std::net::TcpStream::connect(http_addr).unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    closed_within(&mut silent, Duration::from_secs(30)).expect("silent connection left open");
    closed_within(&mut slow, Duration::from_secs(30)).expect("slow connection left open");
    assert!(start.elapsed() < Duration::from_secs(30));
    let mut idle = std::net::TcpStream::connect(http_addr).unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let got = closed_within(&mut idle, Duration::from_secs(30)).expect("idle keep-alive left open");
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    // Meanwhile and after, an administrator signs in, and /metrics counts the verification.
    let (_, _) = login(&m, "ops", "correct-horse-battery");
    let auth = format!("Bearer {}", m.info.admin_token);
    let metrics = get(&m, "/metrics", &[("authorization", &auth)]);
    assert!(
        metrics
            .body
            .contains("baton_password_verifications_total 1"),
        "{}",
        metrics.body
    );
}

/// Opens `count` connections to `addr` from `from` that each hold on slowly: a third
/// trickle request headers, a third trickle a login body after announcing 100 kB, a third
/// send nothing. Returns how many were still open `hold` after the last one connected
/// (the rest were closed by the server: its per-address cap, or its timeouts).
async fn slow_clients(
    addr: std::net::SocketAddr,
    from: std::net::IpAddr,
    count: usize,
    hold: Duration,
) -> usize {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let open = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(std::net::SocketAddr::new(from, 0)).unwrap();
        let Ok(Ok(stream)) =
            tokio::time::timeout(Duration::from_secs(2), socket.connect(addr)).await
        else {
            continue; // left in the backlog: not holding anything either
        };
        let open = open.clone();
        tasks.spawn(async move {
            let (mut read, mut write) = stream.into_split();
            open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let trickle = async move {
                let (head, body): (&[u8], &[u8]) = match i % 3 {
                    0 => (b"", b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: yes\r\n"),
                    1 => (
                        b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100000\r\n\r\n",
                        b"name=ops&password=",
                    ),
                    _ => (b"", b""),
                };
                write.write_all(head).await?;
                for byte in body.iter().cycle().take(60) {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    write.write_all(&[*byte]).await?;
                }
                std::future::pending::<std::io::Result<()>>().await
            };
            let closed = async move {
                let mut buf = [0u8; 1024];
                while read.read(&mut buf).await.unwrap_or(0) > 0 {}
            };
            tokio::select! {
                _ = trickle => {}
                _ = closed => {}
            }
            open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        });
    }
    tokio::time::sleep(hold).await;
    open.load(std::sync::atomic::Ordering::SeqCst)
}

#[test]
fn slow_clients_do_not_keep_an_administrator_out() {
    // 600 slow clients from one address: more than the default cap of 512 connections.
    let m = Manager::start_args(BATON, &[]);
    add_admin(&m, "ops", "correct-horse-battery");
    let http_addr: std::net::SocketAddr = m.info.http_addr.parse().expect("http address");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let attacker: std::net::IpAddr = [127, 0, 0, 2].into();
    let flood = rt.spawn(slow_clients(
        http_addr,
        attacker,
        600,
        Duration::from_secs(3),
    ));
    // Let the flood connect, then sign in from another address while it holds on.
    std::thread::sleep(Duration::from_secs(2));
    let start = Instant::now();
    let (_, _) = login(&m, "ops", "correct-horse-battery");
    let took = start.elapsed();
    let held = rt.block_on(flood).unwrap();
    eprintln!(
        "600 slow clients from {attacker}: {held} held open; administrator signed in in {took:?}"
    );
    assert!(took < Duration::from_secs(2), "sign-in took {took:?}");
    assert!(
        held <= 64,
        "{held} slow connections from one address held open (per-address cap 64)"
    );
    rt.shutdown_background();
}

#[test]
fn parallel_wrong_logins_verify_a_bounded_number_of_passwords() {
    let m = Manager::start_args(BATON, &[]);
    add_admin(&m, "ops", "correct-horse-battery");
    let page = get(&m, "/", &[]);
    let form_csrf = page.cookie("baton_login_csrf").expect("login CSRF cookie");
    let cookie = format!("baton_login_csrf={form_csrf}");
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let tries: Vec<_> = (0..200)
            .map(|i| {
                let (m, cookie, form_csrf) = (&m, &cookie, &form_csrf);
                s.spawn(move || {
                    let name = if i % 2 == 0 { "ops" } else { "nobody" };
                    let body = format!("name={name}&password=wrong-{i}&csrf={form_csrf}");
                    // 0: the connection was closed unanswered (over the per-address cap).
                    try_request(
                        m,
                        "POST",
                        "/login",
                        &[("cookie", cookie)],
                        Some(("application/x-www-form-urlencoded", body)),
                    )
                    .map_or(0, |a| a.status)
                })
            })
            .collect();
        tries.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert!(
        statuses.iter().all(|s| [0, 401, 429, 503].contains(s)),
        "{statuses:?}"
    );
    let auth = format!("Bearer {}", m.info.admin_token);
    let metrics = get(&m, "/metrics", &[("authorization", &auth)]);
    let verified: u64 = metrics
        .body
        .lines()
        .find_map(|l| l.strip_prefix("baton_password_verifications_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the verification counter");
    // At most the verifications running at once plus the address's free failures.
    let bound = 4 + 10;
    eprintln!(
        "200 parallel wrong logins: {verified} password verifications (bound {bound}); answers {:?}",
        [0, 401, 429, 503].map(|c| (c, statuses.iter().filter(|&&s| s == c).count()))
    );
    assert!((1..=bound).contains(&verified), "{verified} verifications");
}
