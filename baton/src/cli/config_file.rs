//! `baton serve --config FILE`: the manager's settings from a TOML file.
//!
//! The file's keys are the long names of `baton serve`'s flags (`listen =
//! "0.0.0.0:7700"`, `up-bps = "10MiB"`, `serial = ["/dev/ttyUSB0"]`), read from
//! the flags' own clap definitions, so every flag is a key without a list kept
//! here. The file's settings become `--KEY=VALUE` arguments parsed by the same
//! value parsers as the command line; a setting the command line (or the
//! environment, e.g. `BATON_DATA_DIR`) gives is left out, so flags win, and a
//! key that names no flag is refused with its name.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::Path;

use anyhow::{Context, bail};
use clap::builder::Resettable;
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command};

/// The key that names the file itself (`--config`); it is not a setting inside it.
pub const CONFIG_KEY: &str = "config";

/// The `--KEY=VALUE` arguments for the settings in the TOML file at `path` that `given` (the
/// command line parsed against `flags`) does not set itself or through the environment.
pub fn arguments_from_file(
    flags: &Command,
    given: &ArgMatches,
    path: &Path,
) -> anyhow::Result<Vec<OsString>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the configuration file {}", path.display()))?;
    let table: toml::Table = toml::from_str(&text)
        .with_context(|| format!("cannot parse the configuration file {}", path.display()))?;
    let mut arguments = Vec::new();
    for (key, value) in &table {
        let Some(flag) = flags
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && key != CONFIG_KEY && !a.is_hide_set())
        else {
            bail!(
                "unknown key `{key}` in {}: the keys are the long names of the flags ({})",
                path.display(),
                keys(flags).join(", ")
            );
        };
        let at = || format!("{}, key `{key}`", path.display());
        let mut values = Vec::new();
        match value {
            toml::Value::Array(items) if matches!(flag.get_action(), ArgAction::Append) => {
                for item in items {
                    values.push(scalar(item).with_context(at)?);
                }
            }
            toml::Value::Array(_) => bail!("{}: takes one value, not a list", at()),
            toml::Value::Boolean(set) if !flag.get_action().takes_values() => {
                // A switch: `true` turns it on, `false` leaves it off.
                if *set {
                    arguments.push(OsString::from(format!("--{key}")));
                }
                continue;
            }
            _ if !flag.get_action().takes_values() => {
                bail!("{}: is a switch, write `{key} = true` or `false`", at())
            }
            other => values.push(scalar(other).with_context(at)?),
        }
        let from_outside = matches!(
            given.value_source(flag.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        for value in values {
            let argument = OsString::from(format!("--{key}={value}"));
            // Checked alone here, so a wrong value is reported with the file and key.
            let alone = Command::new("serve").no_binary_name(true).arg(
                flag.clone()
                    .requires(Resettable::Reset)
                    .conflicts_with(Resettable::Reset),
            );
            if let Err(e) = alone.try_get_matches_from([&argument]) {
                let message = e.render().to_string();
                let first = message.lines().next().unwrap_or_default();
                bail!("{}: {}", at(), first.trim_start_matches("error: "));
            }
            if !from_outside {
                arguments.push(argument);
            }
        }
    }
    Ok(arguments)
}

/// The keys a file for `flags` may hold, in the flags' order.
pub fn keys(flags: &Command) -> Vec<String> {
    flags
        .get_arguments()
        // Hidden flags are for tests (e.g. `--cert-lifetime-secs`), not for a config file.
        .filter(|a| !a.is_hide_set())
        .filter_map(|a| a.get_long())
        .filter(|long| *long != CONFIG_KEY)
        .map(str::to_string)
        .collect()
}

/// One TOML value as the text a flag takes.
fn scalar(value: &toml::Value) -> anyhow::Result<String> {
    Ok(match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Float(x) => x.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Datetime(d) => d.to_string(),
        toml::Value::Array(_) | toml::Value::Table(_) => {
            bail!("takes a string, a number or a boolean here")
        }
    })
}

/// The keys whose settings differ between two results of [`arguments_from_file`] (a
/// reload compares the file's settings before and after).
pub fn changed_keys(before: &[OsString], after: &[OsString]) -> Vec<String> {
    fn settings(arguments: &[OsString]) -> BTreeMap<String, Vec<String>> {
        let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for argument in arguments {
            let text = argument.to_string_lossy();
            let text = text.trim_start_matches("--");
            let (key, value) = text.split_once('=').unwrap_or((text, ""));
            map.entry(key.to_string())
                .or_default()
                .push(value.to_string());
        }
        map
    }
    let (before, after) = (settings(before), settings(after));
    let keys: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    keys.into_iter()
        .filter(|k| before.get(*k) != after.get(*k))
        .cloned()
        .collect()
}
