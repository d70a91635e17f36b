//! The catalog: the streams and rules a user declared, kept in
//! `<data-dir>/catalog.json` and rewritten atomically on every change.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

use crate::event::StreamDef;
use crate::fsutil::write_atomic;
use crate::{Error, Result};

/// Where a rule's rows go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "name")]
pub enum RuleTarget {
    /// The command queue: each row is a command for a device.
    Commands,
    /// Another stream.
    Stream(String),
}

impl std::fmt::Display for RuleTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RuleTarget::Commands => f.write_str("commands"),
            RuleTarget::Stream(s) => f.write_str(s),
        }
    }
}

/// A declared rule. The engine keeps the SQL as text; the SQL front end plans it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleDef {
    pub name: String,
    /// The whole `CREATE RULE` statement, as the user wrote it.
    pub sql: String,
    /// The stream the rule reads.
    pub source: String,
    pub target: RuleTarget,
    pub created_at: i64,
    /// A paused rule keeps its definition and offsets but does not run.
    #[serde(default)]
    pub paused: bool,
    /// Where the rule writes events that arrive after their watermark.
    #[serde(default)]
    pub late_stream: Option<String>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Contents {
    streams: BTreeMap<String, StreamDef>,
    rules: BTreeMap<String, RuleDef>,
}

/// The persistent catalog of streams and rules.
#[derive(Debug)]
pub struct Catalog {
    path: Option<PathBuf>,
    contents: RwLock<Contents>,
}

impl Catalog {
    /// Opens the catalog file, or starts an empty one if there is none.
    pub fn open(path: &Path) -> Result<Self> {
        let contents = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Contents::default(),
            Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
        };
        Ok(Catalog {
            path: Some(path.to_path_buf()),
            contents: RwLock::new(contents),
        })
    }

    /// A catalog that is never written anywhere, for tests.
    pub fn in_memory() -> Self {
        Catalog {
            path: None,
            contents: RwLock::new(Contents::default()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Contents> {
        self.contents.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a change and persists it; the change is undone if it cannot be saved.
    fn update<T>(&self, change: impl FnOnce(&mut Contents) -> Result<T>) -> Result<T> {
        let mut guard = self.contents.write().unwrap_or_else(|p| p.into_inner());
        let mut next = guard.clone();
        let out = change(&mut next)?;
        if let Some(path) = &self.path {
            let bytes =
                serde_json::to_vec_pretty(&next).map_err(|e| Error::Internal(e.to_string()))?;
            write_atomic(path, &bytes)?;
        }
        *guard = next;
        Ok(out)
    }

    /// All streams, by name.
    pub fn streams(&self) -> Vec<StreamDef> {
        self.read().streams.values().cloned().collect()
    }

    /// One stream.
    pub fn stream(&self, name: &str) -> Option<StreamDef> {
        self.read().streams.get(name).cloned()
    }

    /// Declares a stream. Names are shared with the `commands` and `devices` tables.
    pub fn add_stream(&self, def: StreamDef) -> Result<()> {
        if RESERVED_NAMES.contains(&def.name.as_str()) {
            return Err(Error::User(format!(
                "'{}' is a built-in table; choose another stream name",
                def.name
            )));
        }
        self.update(|c| {
            if c.streams.contains_key(&def.name) {
                return Err(Error::AlreadyExists {
                    kind: "stream",
                    name: def.name.clone(),
                });
            }
            c.streams.insert(def.name.clone(), def);
            Ok(())
        })
    }

    /// All rules, by name.
    pub fn rules(&self) -> Vec<RuleDef> {
        self.read().rules.values().cloned().collect()
    }

    /// One rule.
    pub fn rule(&self, name: &str) -> Option<RuleDef> {
        self.read().rules.get(name).cloned()
    }

    /// Declares a rule; its source (and target stream) must exist.
    pub fn add_rule(&self, rule: RuleDef) -> Result<()> {
        self.update(|c| {
            if c.rules.contains_key(&rule.name) {
                return Err(Error::AlreadyExists {
                    kind: "rule",
                    name: rule.name.clone(),
                });
            }
            if !c.streams.contains_key(&rule.source) {
                return Err(Error::NotFound {
                    kind: "stream",
                    name: rule.source.clone(),
                });
            }
            if let RuleTarget::Stream(s) = &rule.target
                && !c.streams.contains_key(s)
            {
                return Err(Error::NotFound {
                    kind: "stream",
                    name: s.clone(),
                });
            }
            c.rules.insert(rule.name.clone(), rule);
            Ok(())
        })
    }

    /// Declares a rule, or replaces the one of the same name, together with
    /// the streams it needs (a derived or late-events stream): all of it is
    /// saved at once, or none of it.
    pub fn put_rule(&self, rule: RuleDef, new_streams: Vec<StreamDef>) -> Result<()> {
        self.update(|c| {
            for def in new_streams {
                if RESERVED_NAMES.contains(&def.name.as_str()) {
                    return Err(Error::User(format!(
                        "'{}' is a built-in table; choose another stream name",
                        def.name
                    )));
                }
                match c.streams.get(&def.name) {
                    Some(existing) if existing != &def => {
                        return Err(Error::AlreadyExists {
                            kind: "stream",
                            name: def.name.clone(),
                        });
                    }
                    _ => {
                        c.streams.insert(def.name.clone(), def);
                    }
                }
            }
            for needed in std::iter::once(&rule.source).chain(match &rule.target {
                RuleTarget::Stream(s) => Some(s),
                RuleTarget::Commands => None,
            }) {
                if !c.streams.contains_key(needed) {
                    return Err(Error::NotFound {
                        kind: "stream",
                        name: needed.clone(),
                    });
                }
            }
            c.rules.insert(rule.name.clone(), rule);
            Ok(())
        })
    }

    /// Pauses or resumes a rule; returns its definition as saved.
    pub fn set_paused(&self, name: &str, paused: bool) -> Result<RuleDef> {
        self.update(|c| {
            let rule = c.rules.get_mut(name).ok_or_else(|| Error::NotFound {
                kind: "rule",
                name: name.to_string(),
            })?;
            rule.paused = paused;
            Ok(rule.clone())
        })
    }

    /// Removes a rule; returns its definition.
    pub fn remove_rule(&self, name: &str) -> Result<RuleDef> {
        self.update(|c| {
            c.rules.remove(name).ok_or_else(|| Error::NotFound {
                kind: "rule",
                name: name.to_string(),
            })
        })
    }
}

/// Table names that are not streams.
pub const RESERVED_NAMES: [&str; 2] = ["commands", "devices"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_and_rules_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.json");
        {
            let c = Catalog::open(&path).unwrap();
            c.add_stream(StreamDef::new("telemetry", vec![], 2).unwrap())
                .unwrap();
            c.add_rule(RuleDef {
                name: "hot".into(),
                sql: "CREATE RULE hot AS ...".into(),
                source: "telemetry".into(),
                target: RuleTarget::Commands,
                created_at: 1,
                paused: false,
                late_stream: None,
            })
            .unwrap();
        }
        let c = Catalog::open(&path).unwrap();
        assert_eq!(c.stream("telemetry").unwrap().partitions, 2);
        assert_eq!(c.rule("hot").unwrap().target, RuleTarget::Commands);
        c.remove_rule("hot").unwrap();
        assert!(Catalog::open(&path).unwrap().rules().is_empty());
    }

    #[test]
    fn refuses_duplicates_missing_sources_and_reserved_names() {
        let c = Catalog::in_memory();
        c.add_stream(StreamDef::new("s", vec![], 1).unwrap())
            .unwrap();
        assert!(matches!(
            c.add_stream(StreamDef::new("s", vec![], 1).unwrap()),
            Err(Error::AlreadyExists { .. })
        ));
        assert!(
            c.add_stream(StreamDef::new("commands", vec![], 1).unwrap())
                .is_err()
        );
        let err = c
            .add_rule(RuleDef {
                name: "r".into(),
                sql: String::new(),
                source: "missing".into(),
                target: RuleTarget::Commands,
                created_at: 0,
                paused: false,
                late_stream: None,
            })
            .unwrap_err();
        assert_eq!(err.to_string(), "stream 'missing' does not exist");
        assert!(c.remove_rule("r").is_err());
    }
}
