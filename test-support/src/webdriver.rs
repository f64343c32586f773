//! A small W3C WebDriver client over the HTTP client the tests already use:
//! starts `chromedriver` with headless Chromium and drives it (navigate, find,
//! click, type, run a script, take a screenshot). Kept in-tree so the browser
//! tests add no dependency tree to the build.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::net::free_tcp_port;
use crate::process::Proc;
use crate::wait::wait_for;

/// A chromedriver process with one browser session; both end when dropped (Chromium runs in
/// chromedriver's process group and goes with it).
#[derive(Debug)]
pub struct Browser {
    driver: Proc,
    base: String,
    session: String,
    http: ureq::Agent,
}

/// An element on the page.
#[derive(Clone, Debug)]
pub struct Element(String);

/// The first of `names` found on `PATH`.
fn which(names: &[&str]) -> Option<String> {
    for n in names {
        for dir in std::env::var("PATH").unwrap_or_default().split(':') {
            let p = Path::new(dir).join(n);
            if p.is_file() {
                return Some(p.to_string_lossy().into_owned());
            }
        }
    }
    None
}

impl Browser {
    /// Starts chromedriver and a headless Chromium window of `width`×`height`.
    /// Panics (the test fails) when Chromium or chromedriver is missing.
    pub fn start(width: u32, height: u32) -> Browser {
        let driver_bin = which(&["chromedriver"]).expect(
            "chromedriver not found: install Debian's `chromium` and `chromium-driver` (scripts/test.sh does)",
        );
        let chrome_bin = which(&["chromium", "chromium-browser", "google-chrome"])
            .expect("chromium not found: install Debian's `chromium` package");
        let port = free_tcp_port();
        let mut cmd = Command::new(driver_bin);
        cmd.arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let driver = Proc::spawn_with("chromedriver", cmd, None);
        let http: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let base = format!("http://127.0.0.1:{port}");
        let mut b = Browser {
            driver,
            base,
            session: String::new(),
            http,
        };
        wait_for(
            "chromedriver ready",
            Duration::from_secs(20),
            String::new,
            || {
                let mut r = b.http.get(format!("{}/status", b.base)).call().ok()?;
                let v = r.body_mut().read_json::<Value>().ok()?;
                (v["value"]["ready"] == true).then_some(())
            },
        );
        let caps = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": chrome_bin,
                    "args": [
                        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--hide-scrollbars", "--force-device-scale-factor=1",
                        format!("--window-size={width},{height}"),
                    ],
                },
            }}
        });
        let v = b.call("POST", "/session", Some(caps));
        b.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
            .to_string();
        b
    }

    /// One WebDriver request; panics on an error status; returns the answer's `value`.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let resp = match method {
            "GET" => self.http.get(&url).call(),
            "DELETE" => self.http.delete(&url).call(),
            _ => self.http.post(&url).send_json(body.unwrap_or(json!({}))),
        };
        let mut resp = resp.unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let status = resp.status().as_u16();
        let v: Value = resp.body_mut().read_json().unwrap_or(Value::Null);
        assert!(
            status < 400,
            "WebDriver {method} {path} answered {status}: {v}"
        );
        v["value"].clone()
    }

    /// `path` under this session.
    fn s(&self, path: &str) -> String {
        format!("/session/{}{path}", self.session)
    }

    /// Opens `url`.
    pub fn goto(&self, url: &str) {
        self.call("POST", &self.s("/url"), Some(json!({ "url": url })));
    }

    /// Resizes the window.
    pub fn resize(&self, width: u32, height: u32) {
        self.call(
            "POST",
            &self.s("/window/rect"),
            Some(json!({ "width": width, "height": height })),
        );
    }

    /// The first element matching the CSS selector, waiting up to `limit` for it.
    pub fn wait_find(&self, css: &str, limit: Duration) -> Element {
        wait_for(
            &format!("element {css:?}"),
            limit,
            || format!("page text:\n{}", self.page_text()),
            || self.find_all(css).into_iter().next(),
        )
    }

    /// The first element matching the CSS selector (waits up to 10 s).
    pub fn find(&self, css: &str) -> Element {
        self.wait_find(css, Duration::from_secs(10))
    }

    /// Every element matching the CSS selector now.
    pub fn find_all(&self, css: &str) -> Vec<Element> {
        let v = self.call(
            "POST",
            &self.s("/elements"),
            Some(json!({ "using": "css selector", "value": css })),
        );
        v.as_array()
            .map(|a| {
                a.iter()
                    // An element reference is an object with one `element-…` key.
                    .filter_map(|e| {
                        let obj = e.as_object()?;
                        let (_, id) = obj.iter().find(|(k, _)| k.starts_with("element-"))?;
                        Some(Element(id.as_str()?.to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Clicks an element.
    pub fn click(&self, e: &Element) {
        self.call("POST", &self.s(&format!("/element/{}/click", e.0)), None);
    }

    /// Clears an input and types `text` into it (a file path for a file input).
    pub fn fill(&self, e: &Element, text: &str) {
        self.call("POST", &self.s(&format!("/element/{}/clear", e.0)), None);
        self.call(
            "POST",
            &self.s(&format!("/element/{}/value", e.0)),
            Some(json!({ "text": text })),
        );
    }

    /// Types into an element without clearing it first.
    pub fn type_into(&self, e: &Element, text: &str) {
        self.call(
            "POST",
            &self.s(&format!("/element/{}/value", e.0)),
            Some(json!({ "text": text })),
        );
    }

    /// The element's visible text.
    pub fn text(&self, e: &Element) -> String {
        self.call("GET", &self.s(&format!("/element/{}/text", e.0)), None)
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Runs `script` (a function body; `arguments` are `args`) and returns its value.
    pub fn eval(&self, script: &str, args: Value) -> Value {
        self.call(
            "POST",
            &self.s("/execute/sync"),
            Some(json!({ "script": script, "args": args })),
        )
    }

    /// Waits until `script` returns `true`, for at most `limit`.
    pub fn wait_until(&self, what: &str, script: &str, limit: Duration) {
        wait_for(
            what,
            limit,
            || format!("page text:\n{}", self.page_text()),
            || (self.eval(script, json!([])) == Value::Bool(true)).then_some(()),
        );
    }

    /// The page's text, for failure messages.
    pub fn page_text(&self) -> String {
        self.eval(
            "return document.body ? document.body.innerText : ''",
            json!([]),
        )
        .as_str()
        .unwrap_or("")
        .to_string()
    }

    /// The current URL.
    pub fn url(&self) -> String {
        self.call("GET", &self.s("/url"), None)
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Saves a PNG screenshot of the window to `path`.
    pub fn screenshot(&self, path: &Path) {
        let v = self.call("GET", &self.s("/screenshot"), None);
        let png = base64_decode(v.as_str().expect("screenshot is base64"));
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self
                .http
                .delete(format!("{}/session/{}", self.base, self.session))
                .call();
        }
        self.driver.kill_group();
    }
}

/// Decodes standard base64 (padding and whitespace allowed).
pub fn base64_decode(text: &str) -> Vec<u8> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes().filter_map(value) {
        acc = (acc << 6) | c;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn base64_round() {
        assert_eq!(base64_decode("aGVsbG8="), b"hello");
        assert_eq!(base64_decode("aGk="), b"hi");
        assert_eq!(base64_decode("AAEC\n/w=="), [0, 1, 2, 255]);
    }
}
