//! Bounded polling, and reading the logs that polling looks at.

use std::fs::File;
use std::io::Read as _;
use std::path::Path;
use std::time::{Duration, Instant};

/// How often [`wait_for`] asks again.
pub const POLL: Duration = Duration::from_millis(20);

/// Polls `probe` every [`POLL`] until it returns `Some`; panics with `what` and `context()`
/// past `limit`.
pub fn wait_for<T>(
    what: &str,
    limit: Duration,
    context: impl Fn() -> String,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(t) = probe() {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}\n{}",
            context()
        );
        std::thread::sleep(POLL);
    }
}

/// Reads a text file, empty if it does not exist (yet); invalid UTF-8 is replaced.
pub fn read_text(path: &Path) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The last `n` lines of `text`, for failure messages.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn waits_until_the_probe_answers() {
        let mut calls = 0;
        let got = wait_for(
            "the third call",
            Duration::from_secs(5),
            String::new,
            || {
                calls += 1;
                (calls == 3).then_some(calls)
            },
        );
        assert_eq!(got, 3);
    }

    #[test]
    #[should_panic(expected = "never: not within")]
    fn gives_up_with_what_it_waited_for() {
        wait_for(
            "never",
            Duration::from_millis(50),
            String::new,
            || None::<()>,
        );
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(read_text(Path::new("/nonexistent/baton")), "");
    }
}
