//! The administrators' web UI: login, sessions, CSRF, and the pages.
//!
//! Everything the browser loads is compiled into the `baton` binary
//! (`include_str!`): the login page, the application page, one stylesheet and
//! one script of plain JavaScript that talks to `/api/v1` with the session
//! cookie. No front-end build step.
//!
//! - `GET /` answers the login form (an HTML page with a password field) to a
//!   visitor without a session and the application to an administrator;
//! - `POST /login` checks name and password (argon2) and sets the session
//!   cookie (`HttpOnly`, `SameSite=Strict`, `Secure` over HTTPS);
//! - `POST /logout` ends the session.
//!
//! Failed logins back off per client address and per name ([`baton_manager_core::login_limit`]):
//! past a few failures the answer is `429` with `Retry-After`, doubling. Every login that
//! reaches the password check, right or wrong, is recorded in the audit log
//! ([`crate::audit`]).
//!
//! CSRF: the login form carries a token that must match a cookie set with the
//! form (double submit); a session has its own random token, given to the page
//! in a `<meta>` tag, which every changing request must send back in
//! `X-CSRF-Token` (the logout form sends it as a field).
//!
//! Sessions are kept in the manager's database through the [`crate::store::Store`] (only a
//! hash of the session id, so a copy of the file logs nobody in): they survive
//! a restart of the manager and end at logout, after [`SESSION_IDLE`]
//! without use, [`SESSION_MAX_AGE`] after login however much they are used, and
//! when the administrator's password changes. Passwords and API tokens: [`users`].

pub mod users;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;

use crate::registry::{SharedStore, lock, unix_now};
use crate::store::{SessionRecord, StoreError, secret_digest};
use baton_agent_core::linux::spaced::SpacedLog;
use baton_manager_core::login_limit::{LoginLimiter, LoginLimits, retry_after_secs};

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "baton_session";
/// Name of the cookie that carries the login form's CSRF token.
pub const LOGIN_CSRF_COOKIE: &str = "baton_login_csrf";
/// Header in which the UI sends the session's CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// A session unused this long ends.
pub const SESSION_IDLE: Duration = Duration::from_secs(2 * 3600);
/// A session ends this long after its login, however much it is used.
pub const SESSION_MAX_AGE: Duration = Duration::from_secs(12 * 3600);
/// Most sessions kept at once (the oldest is dropped beyond).
const MAX_SESSIONS: usize = 10_000;

const LOGIN_HTML: &str = include_str!("assets/login.html");
const APP_HTML: &str = include_str!("assets/app.html");
const STYLE_CSS: &str = include_str!("assets/style.css");
const APP_JS: &str = include_str!("assets/app.js");
const ICON_SVG: &str = include_str!("assets/icon.svg");

/// A logged-in administrator's session, as the auth layer sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    /// The administrator.
    pub admin: String,
    /// The token changing requests must carry.
    pub csrf: String,
    /// The administrator's role, read at each request (a change applies at once).
    pub role: crate::roles::Role,
}

/// The web UI's state: the store (administrators, sessions) and the login back-off.
#[derive(Debug)]
pub struct Web {
    /// The manager's store, where administrators, API tokens and sessions are kept.
    pub store: SharedStore,
    /// Whether cookies get `Secure` (the server speaks HTTPS).
    pub secure_cookies: bool,
    /// Failed logins per client address and per name.
    login_limiter: Mutex<LoginLimiter>,
    /// Password verifications (argon2, ~19 MiB each) running at once, at most
    /// [`MAX_CONCURRENT_VERIFICATIONS`].
    verifications: Arc<tokio::sync::Semaphore>,
    /// Places for logins verifying or waiting to: [`MAX_CONCURRENT_VERIFICATIONS`] +
    /// [`MAX_WAITING_VERIFICATIONS`]; a login without one is answered `503`.
    login_places: Arc<tokio::sync::Semaphore>,
    /// Password verifications since start (real and for unknown names), for `/metrics`.
    pub password_verifications: std::sync::atomic::AtomicU64,
}

/// Password verifications (argon2id, ~19 MiB and tens of ms each) that run at once;
/// further logins wait their turn.
pub const MAX_CONCURRENT_VERIFICATIONS: usize = 4;
/// Logins that wait for a password verification at most; further ones are answered
/// `503 Service Unavailable` with `Retry-After`.
pub const MAX_WAITING_VERIFICATIONS: usize = 64;
/// Longest administrator name a login may give (longer ones are wrong at once).
pub const MAX_NAME_LEN: usize = 64;
/// The warning about logins refused for too many failures, spaced.
static REFUSED_LOGINS: SpacedLog = SpacedLog::new(baton_agent_core::linux::spaced::WARN_EVERY);

/// `bytes` random bytes from the OS, in hex (session ids, CSRF tokens, API tokens).
pub(crate) fn random_hex(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut raw);
    hex::encode(raw)
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// Escapes text for HTML element content and attribute values.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

impl Web {
    /// Records a login attempt that reached the password check in the audit log (those
    /// turned away before it, busy or backed off, cost nothing and are not recorded).
    fn audit_login(&self, name: &str, client: std::net::SocketAddr, outcome: Result<(), &str>) {
        let (result, status, error) = match outcome {
            Ok(()) => ("ok", StatusCode::SEE_OTHER, None),
            Err(e) => ("refused", StatusCode::UNAUTHORIZED, Some(e.to_string())),
        };
        let entry = crate::store::AuditEntry {
            id: 0,
            at: unix_now(),
            via: "login".into(),
            who: name.into(),
            address: client.ip().to_string(),
            action: "login".into(),
            target: String::new(),
            result: result.into(),
            status: Some(status.as_u16()),
            error,
        };
        crate::audit::record(&mut **lock(&self.store), entry);
    }

    /// Over the manager's `store`; `secure_cookies` when served over HTTPS.
    pub fn new(store: SharedStore, secure_cookies: bool) -> Self {
        Web {
            store,
            secure_cookies,
            login_limiter: Mutex::new(LoginLimiter::new(LoginLimits::default())),
            verifications: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_VERIFICATIONS)),
            login_places: Arc::new(tokio::sync::Semaphore::new(
                MAX_CONCURRENT_VERIFICATIONS + MAX_WAITING_VERIFICATIONS,
            )),
            password_verifications: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// With other login back-off limits than the defaults.
    pub fn with_login_limits(mut self, limits: LoginLimits) -> Self {
        self.login_limiter = Mutex::new(LoginLimiter::new(limits));
        self
    }

    fn login_limiter(&self) -> std::sync::MutexGuard<'_, LoginLimiter> {
        self.login_limiter.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a session for `admin`, whose password was verified against
    /// `password_hash`; returns the cookie token, or `None` when the password changed
    /// since (the login raced the change).
    pub fn start_session(
        &self,
        admin: &str,
        password_hash: &str,
    ) -> Result<Option<String>, StoreError> {
        self.start_session_at(admin, password_hash, unix_now())
    }

    /// [`Web::start_session`] at `now` (Unix seconds). Idle sessions end first, and the
    /// least recently used beyond [`MAX_SESSIONS`].
    fn start_session_at(
        &self,
        admin: &str,
        password_hash: &str,
        now: u64,
    ) -> Result<Option<String>, StoreError> {
        let token = random_hex(32);
        let mut store = lock(&self.store);
        store.expire_sessions(now.saturating_sub(SESSION_IDLE.as_secs()), MAX_SESSIONS - 1)?;
        let record = SessionRecord {
            id_hash: secret_digest(&token),
            admin: admin.to_string(),
            csrf: random_hex(24),
            created_at: now,
            last_used: now,
        };
        Ok(store
            .create_session(&record, password_hash)?
            .then_some(token))
    }

    /// The live session the request's cookie names (and marks it used).
    pub fn session_of(&self, headers: &HeaderMap) -> Option<SessionInfo> {
        self.session_at(headers, unix_now())
    }

    /// [`Web::session_of`] at `now` (Unix seconds). A store that fails is no session.
    fn session_at(&self, headers: &HeaderMap, now: u64) -> Option<SessionInfo> {
        let token = cookie(headers, SESSION_COOKIE)?;
        let key = secret_digest(token);
        let mut store = lock(&self.store);
        let session = store
            .session(&key)
            .inspect_err(|e| tracing::error!("cannot read sessions: {e}"))
            .ok()??;
        // Idle this long either way: a wall clock that stepped back a long way ends the
        // session too, rather than keeping it alive until the clock catches up.
        if now.abs_diff(session.last_used) >= SESSION_IDLE.as_secs()
            || now.abs_diff(session.created_at) >= SESSION_MAX_AGE.as_secs()
        {
            if let Err(e) = store.delete_session(&key) {
                tracing::error!("cannot end an idle or old session: {e}");
            }
            return None;
        }
        if now != session.last_used
            && let Err(e) = store.touch_session(&key, now)
        {
            tracing::error!("cannot mark a session used: {e}");
        }
        // An administrator removed since the login has no role: no session.
        let role = store
            .admin_role(&session.admin)
            .inspect_err(|e| tracing::error!("cannot read an administrator's role: {e}"))
            .ok()??;
        Some(SessionInfo {
            admin: session.admin,
            csrf: session.csrf,
            role,
        })
    }

    /// Ends the session the request's cookie names.
    pub fn end_session(&self, headers: &HeaderMap) {
        if let Some(token) = cookie(headers, SESSION_COOKIE)
            && let Err(e) = lock(&self.store).delete_session(&secret_digest(token))
        {
            tracing::error!("cannot end a session: {e}");
        }
    }

    fn cookie_header(&self, name: &str, value: &str, max_age: Option<u64>) -> HeaderValue {
        let mut c = format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict");
        if let Some(age) = max_age {
            c.push_str(&format!("; Max-Age={age}"));
        }
        if self.secure_cookies {
            c.push_str("; Secure");
        }
        HeaderValue::from_str(&c).expect("cookie values are hex")
    }
}

/// The UI's routes (all public; the pages themselves check the session).
pub fn routes(web: Arc<Web>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/login", post(login).get(|| async { Redirect::to("/") }))
        .route("/logout", post(logout))
        .route("/static/{file}", get(asset))
        .with_state(web)
}

fn html_page(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
                 connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            ),
        ],
        body,
    )
        .into_response()
}

fn login_page(web: &Web, status: StatusCode, error: Option<&str>, name: &str) -> Response {
    let csrf = random_hex(24);
    let error_html = error
        .map(|e| {
            format!(
                r#"<p class="form-error" role="alert">{}</p>"#,
                escape_html(e)
            )
        })
        .unwrap_or_default();
    let body = LOGIN_HTML
        .replace("{{csrf}}", &csrf)
        .replace("{{error}}", &error_html)
        .replace("{{name}}", &escape_html(name));
    let mut resp = html_page(status, body);
    resp.headers_mut().append(
        header::SET_COOKIE,
        web.cookie_header(LOGIN_CSRF_COOKIE, &csrf, Some(3600)),
    );
    resp
}

/// The login page answered `429` with `Retry-After` while a login's address or name is locked.
/// `503` with `Retry-After`: too many logins wait for a password verification.
fn busy(web: &Web, name: &str) -> Response {
    let mut resp = login_page(
        web,
        StatusCode::SERVICE_UNAVAILABLE,
        Some("The server is busy. Please try again in a moment."),
        name,
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(1u64));
    resp
}

fn too_many_logins(web: &Web, wait: Duration, name: &str) -> Response {
    let secs = retry_after_secs(wait);
    let mut resp = login_page(
        web,
        StatusCode::TOO_MANY_REQUESTS,
        Some(&format!("Too many failed logins. Try again in {secs} s.")),
        name,
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

async fn index(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    match web.session_of(&headers) {
        Some(session) => html_page(
            StatusCode::OK,
            APP_HTML
                .replace("{{csrf}}", &session.csrf)
                .replace("{{admin}}", &escape_html(&session.admin))
                .replace("{{role}}", session.role.as_str()),
        ),
        None => login_page(&web, StatusCode::OK, None, ""),
    }
}

/// The login form's fields.
#[derive(Debug, Deserialize)]
pub struct LoginForm {
    /// Administrator name.
    pub name: String,
    /// Password.
    pub password: String,
    /// The form's CSRF token.
    pub csrf: String,
}

async fn login(
    State(web): State<Arc<Web>>,
    ConnectInfo(crate::http::client::ClientAddr(client)): ConnectInfo<
        crate::http::client::ClientAddr,
    >,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return login_page(
            &web,
            StatusCode::BAD_REQUEST,
            Some("Fill in name and password."),
            "",
        );
    };
    let expected = cookie(&headers, LOGIN_CSRF_COOKIE).unwrap_or("");
    if expected.is_empty()
        || !crate::http::client::same_secret(expected.as_bytes(), form.csrf.as_bytes())
    {
        return login_page(
            &web,
            StatusCode::FORBIDDEN,
            Some("The form expired. Please try again."),
            &form.name,
        );
    }
    let name = form.name.trim().to_string();
    if name.len() > MAX_NAME_LEN {
        return login_page(
            &web,
            StatusCode::UNAUTHORIZED,
            Some("Wrong name or password."),
            "",
        );
    }
    // A place among the logins verifying or waiting to, before anything is counted: a
    // login turned away busy is not a failure. Places and permits are owned, so a client
    // that disconnects gives them back, and the permit stays with the verification
    // until argon2 is done.
    let Ok(place) = web.login_places.clone().try_acquire_owned() else {
        return busy(&web, &name);
    };
    // Names that are no administrator's share one key: junk names cost no memory.
    // The name's hash, looked up once (the password is checked against it below), and
    // whether the name is an administrator's in any case (it keys the back-off).
    let (hash, known) = {
        let store = lock(&web.store);
        let hash = store.admin_hash(&name).unwrap_or_else(|e| {
            tracing::error!("cannot read administrators: {e}");
            None
        });
        let known = hash.is_some()
            || store
                .admins()
                .is_ok_and(|admins| admins.iter().any(|a| a.eq_ignore_ascii_case(&name)));
        (hash, known)
    };
    let keys = if known {
        LoginLimiter::keys(client.ip(), &name).to_vec()
    } else {
        LoginLimiter::keys_for_unknown_name(client.ip()).to_vec()
    };
    // Checked and counted in one step; a right password clears the count below.
    let caused = match web.login_limiter().attempt(&keys, Instant::now()) {
        Ok(caused) => caused,
        Err(wait) => {
            if let Some(held_back) = REFUSED_LOGINS.due() {
                tracing::warn!(admin = %name, %client, held_back, "login refused: too many failures");
            }
            return too_many_logins(&web, wait, &name);
        }
    };
    let Ok(permit) = web.verifications.clone().acquire_owned().await else {
        return busy(&web, &name);
    };
    drop(place);
    web.password_verifications.fetch_add(1, Ordering::Relaxed);
    let password = form.password;
    // The hash the password matched, if it did.
    let verified = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        match hash {
            Some(hash) => users::password_matches(&password, &hash).then_some(hash),
            None => {
                // Spend the same time as a real check, so names cannot be probed by timing.
                let _ = users::hash_password(&password);
                None
            }
        }
    })
    .await
    .ok()
    .flatten();
    let Some(verified) = verified else {
        tracing::warn!(admin = %name, %client, "failed login");
        web.audit_login(&name, client, Err("wrong name or password"));
        if let Some(wait) = caused {
            return too_many_logins(&web, wait, &name);
        }
        return login_page(
            &web,
            StatusCode::UNAUTHORIZED,
            Some("Wrong name or password."),
            &name,
        );
    };
    web.login_limiter().succeeded(&keys, Instant::now());
    let token = match web.start_session(&name, &verified) {
        Ok(Some(token)) => token,
        Ok(None) => {
            tracing::warn!(admin = %name, %client, "login refused: the password changed meanwhile");
            return login_page(
                &web,
                StatusCode::UNAUTHORIZED,
                Some("Wrong name or password."),
                &name,
            );
        }
        Err(e) => {
            tracing::error!(admin = %name, "cannot start a session: {e}");
            return login_page(
                &web,
                StatusCode::INTERNAL_SERVER_ERROR,
                Some("The login could not be recorded. Please try again."),
                &name,
            );
        }
    };
    tracing::info!(admin = %name, "administrator logged in");
    web.audit_login(&name, client, Ok(()));
    let mut resp = Redirect::to("/").into_response();
    let h = resp.headers_mut();
    h.append(
        header::SET_COOKIE,
        web.cookie_header(SESSION_COOKIE, &token, None),
    );
    h.append(
        header::SET_COOKIE,
        web.cookie_header(LOGIN_CSRF_COOKIE, "", Some(0)),
    );
    resp
}

/// The logout form's fields.
#[derive(Debug, Deserialize)]
pub struct LogoutForm {
    /// The session's CSRF token.
    pub csrf: String,
}

async fn logout(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    form: Result<Form<LogoutForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Some(session) = web.session_of(&headers) else {
        return Redirect::to("/").into_response();
    };
    let given = form.map(|Form(f)| f.csrf).unwrap_or_default();
    if !crate::http::client::same_secret(given.as_bytes(), session.csrf.as_bytes()) {
        return (StatusCode::FORBIDDEN, "missing or wrong CSRF token").into_response();
    }
    web.end_session(&headers);
    tracing::info!(admin = %session.admin, "administrator logged out");
    let mut resp = Redirect::to("/").into_response();
    resp.headers_mut().append(
        header::SET_COOKIE,
        web.cookie_header(SESSION_COOKIE, "", Some(0)),
    );
    resp
}

async fn asset(Path(file): Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "style.css" => (STYLE_CSS, "text/css; charset=utf-8"),
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "icon.svg" => (ICON_SVG, "image/svg+xml"),
        _ => return (StatusCode::NOT_FOUND, "no such file").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::store::Store;

    #[test]
    fn cookies_and_escaping() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; baton_session=abc"),
        );
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "c"), None);
        assert_eq!(
            escape_html("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    fn web_over(store: crate::store::SqliteStore) -> Web {
        Web::new(
            Arc::new(Mutex::new(Box::new(store) as Box<dyn Store>)),
            true,
        )
    }

    /// A session for `admin` (made an administrator with a stand-in hash) started at `now`.
    fn signed_in(web: &Web, admin: &str, now: u64) -> String {
        let hash = format!("hash-of-{admin}");
        lock(&web.store).set_admin(admin, &hash, None, 1).unwrap();
        web.start_session_at(admin, &hash, now).unwrap().unwrap()
    }

    fn with_cookie(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("{SESSION_COOKIE}={token}")).unwrap(),
        );
        h
    }

    #[test]
    fn sessions_start_and_end() {
        let web = web_over(crate::store::SqliteStore::in_memory().unwrap());
        let token = signed_in(&web, "ops", unix_now());
        let h = with_cookie(&token);
        let s = web.session_of(&h).unwrap();
        assert_eq!(s.admin, "ops");
        assert_eq!(s.csrf.len(), 48);
        let mut other = HeaderMap::new();
        other.insert(header::COOKIE, HeaderValue::from_static("baton_session=00"));
        assert_eq!(web.session_of(&other), None);
        // Only a hash of the session id is stored.
        let stored = lock(&web.store).session(&secret_digest(&token)).unwrap();
        assert_eq!(stored.unwrap().admin, "ops");
        web.end_session(&h);
        assert_eq!(web.session_of(&h), None);
        let c = web.cookie_header(SESSION_COOKIE, "x", None);
        let c = c.to_str().unwrap();
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Secure"));
    }

    #[tokio::test]
    async fn a_session_has_its_administrators_role_and_the_page_carries_it() {
        use crate::roles::Role;
        let web = Arc::new(web_over(crate::store::SqliteStore::in_memory().unwrap()));
        let ops = with_cookie(&signed_in(&web, "ops", unix_now()));
        assert_eq!(web.session_of(&ops).unwrap().role, Role::Admin);
        lock(&web.store)
            .set_admin("viewer", "hash-of-viewer", Some(Role::Read), 1)
            .unwrap();
        let viewer = with_cookie(&signed_in(&web, "viewer", unix_now()));
        assert_eq!(web.session_of(&viewer).unwrap().role, Role::Read);
        let page = index(State(web.clone()), viewer).await;
        let body = axum::body::to_bytes(page.into_body(), 1 << 20)
            .await
            .unwrap();
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.contains(r#"<meta name="baton-role" content="read">"#),
            "{body}"
        );
        assert!(!body.contains("{{role}}"));
    }

    #[test]
    fn sessions_end_when_idle_and_use_keeps_them() {
        let web = web_over(crate::store::SqliteStore::in_memory().unwrap());
        let idle = SESSION_IDLE.as_secs();
        let h = with_cookie(&signed_in(&web, "ops", 1000));
        assert!(
            web.session_at(&h, 1000 + idle - 1).is_some(),
            "used just in time"
        );
        assert!(
            web.session_at(&h, 1000 + 2 * idle - 2).is_some(),
            "use restarts the clock"
        );
        assert_eq!(
            web.session_at(&h, 1000 + 3 * idle - 2),
            None,
            "idle too long"
        );
        // An idle session is gone, not only refused.
        assert_eq!(web.session_at(&h, 1000), None);
        // Starting a session clears idle ones.
        let old = secret_digest(&signed_in(&web, "a", 5000));
        signed_in(&web, "b", 5000 + idle);
        assert_eq!(lock(&web.store).session(&old).unwrap(), None);
    }

    #[test]
    fn sessions_end_at_their_maximum_age_however_used() {
        let web = web_over(crate::store::SqliteStore::in_memory().unwrap());
        let max = SESSION_MAX_AGE.as_secs();
        let step = SESSION_IDLE.as_secs() / 2;
        let h = with_cookie(&signed_in(&web, "ops", 1000));
        let mut now = 1000;
        while now + step < 1000 + max {
            now += step;
            assert!(web.session_at(&h, now).is_some(), "in use at {now}");
        }
        assert_eq!(web.session_at(&h, 1000 + max), None, "too old");
        assert_eq!(
            web.session_at(&h, 1000 + max - 1),
            None,
            "gone, not only refused"
        );
    }

    #[test]
    fn a_password_change_ends_the_administrators_sessions() {
        let web = web_over(crate::store::SqliteStore::in_memory().unwrap());
        users::set_admin(&mut **lock(&web.store), "ops", "first password", None, 1).unwrap();
        let h = with_cookie(&signed_in(&web, "ops", 1000));
        assert!(web.session_at(&h, 1001).is_some());
        let old_hash = lock(&web.store).admin_hash("ops").unwrap().unwrap();
        users::set_admin(&mut **lock(&web.store), "ops", "second password", None, 2).unwrap();
        assert_eq!(web.session_at(&h, 1002), None);
        // A login that verified the old password before the change starts no session.
        assert_eq!(web.start_session_at("ops", &old_hash, 1003).unwrap(), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn logins_beyond_the_waiting_cap_are_told_to_come_back() {
        use tower::ServiceExt as _;
        // No back-off lock gets in the way: this is about the queue.
        let limits = LoginLimits {
            free_failures_per_name_everywhere: 10_000,
            ..LoginLimits::default()
        };
        let web = Arc::new(
            web_over(crate::store::SqliteStore::in_memory().unwrap()).with_login_limits(limits),
        );
        let app = routes(web.clone());
        let login = |i: usize| {
            let mut req = axum::http::Request::post("/login")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .header(header::COOKIE, format!("{LOGIN_CSRF_COOKIE}=c1"))
                .body(axum::body::Body::from(format!(
                    "name=n{i}&password=wrong&csrf=c1"
                )))
                .unwrap();
            // Each from its own address and name: no back-off lock applies.
            let client =
                std::net::SocketAddr::from(([10, 1, (i / 250) as u8, (i % 250) as u8], 4000));
            req.extensions_mut()
                .insert(ConnectInfo(crate::http::client::ClientAddr(client)));
            app.clone().oneshot(req)
        };
        // Every verification slot taken: logins queue up to the cap.
        let slots = web
            .verifications
            .acquire_many(MAX_CONCURRENT_VERIFICATIONS as u32)
            .await
            .unwrap();
        let mut waiting = tokio::task::JoinSet::new();
        // Every place taken: logins queue for the slots.
        let places = MAX_CONCURRENT_VERIFICATIONS + MAX_WAITING_VERIFICATIONS;
        // A client that goes away while its login waits gives its place back.
        let gone = tokio::spawn(login(10_000));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while web.login_places.available_permits() == places {
            assert!(
                std::time::Instant::now() < deadline,
                "the login did not queue"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        gone.abort();
        let _ = gone.await;
        assert_eq!(web.login_places.available_permits(), places);
        for i in 0..places {
            waiting.spawn(login(i));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while web.login_places.available_permits() > 0 {
            assert!(std::time::Instant::now() < deadline, "logins did not queue");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let over = login(places).await.unwrap();
        assert_eq!(over.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(over.headers()[header::RETRY_AFTER], "1");
        assert_eq!(web.password_verifications.load(Ordering::Relaxed), 0);
        // Once the slots are free the queued ones are verified (and fail: no such names).
        drop(slots);
        let answers = tokio::time::timeout(Duration::from_secs(120), waiting.join_all())
            .await
            .expect("queued logins did not finish");
        assert!(answers.iter().all(|r| {
            r.as_ref()
                .is_ok_and(|r| r.status() == StatusCode::UNAUTHORIZED)
        }));
        assert_eq!(
            web.password_verifications.load(Ordering::Relaxed),
            places as u64
        );
        // Every place is back, also those of logins whose clients went away.
        assert_eq!(web.login_places.available_permits(), places);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn parallel_wrong_logins_verify_at_most_concurrency_plus_lock_threshold() {
        use tower::ServiceExt as _;
        let web = Arc::new(web_over(crate::store::SqliteStore::in_memory().unwrap()));
        users::set_admin(
            &mut **lock(&web.store),
            "ops",
            "the right password",
            None,
            1,
        )
        .unwrap();
        let app = routes(web.clone());
        let client = std::net::SocketAddr::from(([10, 0, 0, 1], 4000));
        let login = |name: &'static str| {
            let mut req = axum::http::Request::post("/login")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .header(header::COOKIE, format!("{LOGIN_CSRF_COOKIE}=c1"))
                .body(axum::body::Body::from(format!(
                    "name={name}&password=wrong-password&csrf=c1"
                )))
                .unwrap();
            req.extensions_mut()
                .insert(ConnectInfo(crate::http::client::ClientAddr(client)));
            app.clone().oneshot(req)
        };
        let before = web
            .password_verifications
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200 {
            // Known and unknown names alike.
            tasks.spawn(login(if i % 2 == 0 { "ops" } else { "nobody" }));
        }
        let answers = tokio::time::timeout(Duration::from_secs(60), tasks.join_all())
            .await
            .expect("logins did not finish within 60 s");
        assert!(answers.iter().all(|r| r.as_ref().is_ok_and(|r| {
            r.status() == StatusCode::UNAUTHORIZED || r.status() == StatusCode::TOO_MANY_REQUESTS
        })));
        let verified = web
            .password_verifications
            .load(std::sync::atomic::Ordering::Relaxed)
            - before;
        let limits = LoginLimits::default();
        let bound = (MAX_CONCURRENT_VERIFICATIONS as u32 + limits.free_failures_per_address) as u64;
        assert!(
            verified >= 1 && verified <= bound,
            "{verified} verifications, bound {bound}"
        );
    }

    #[test]
    fn sessions_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("baton.db");
        let web = web_over(crate::store::SqliteStore::open(&path).unwrap());
        let h = with_cookie(&signed_in(&web, "ops", unix_now()));
        let csrf = web.session_of(&h).unwrap().csrf;
        drop(web);
        let web = web_over(crate::store::SqliteStore::open(&path).unwrap());
        let s = web.session_of(&h).unwrap();
        assert_eq!((s.admin.as_str(), s.csrf), ("ops", csrf));
    }
}
