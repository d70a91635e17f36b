//! Runs every SQL statement the API receives: declares streams and rules,
//! shows them, and answers queries.

use std::sync::Arc;

use anyhow::Context;
use arrow::array::{ArrayRef, BooleanArray, RecordBatch, StringArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use tributary_engine::catalog::{Catalog, RESERVED_NAMES, RuleDef};
use tributary_engine::devices::{DeviceRow, DeviceTable};
use tributary_engine::event::{SYSTEM_COLUMNS, StreamDef, now_millis};
use tributary_engine::log::SharedEventStream;
use tributary_engine::rule::{Handover, RuleRuntime};
use tributary_ingest::gateway::GatewayHandle;
use tributary_registry::{DeviceStatus, SharedRegistry};
use tributary_sinks::parquet::ParquetSinks;
use tributary_sql::query::{QueryEngine, QueryResult};
use tributary_sql::rule::{CompiledRule, compile_rule_with_devices};
use tributary_sql::statement::{RuleStatement, Statement, parse};

/// The part of the server that executes SQL.
pub struct SqlService {
    pub catalog: Arc<Catalog>,
    pub log: SharedEventStream,
    pub rules: Arc<RuleRuntime>,
    pub sinks: Arc<ParquetSinks>,
    pub queries: QueryEngine,
    /// One DDL statement at a time, so the catalog and the log never disagree.
    pub ddl: tokio::sync::Mutex<()>,
    /// The registry's devices, as rules and queries join them.
    pub devices: Arc<DeviceTable>,
    /// Why rules that should run could not be started (after a restart).
    pub failed: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// One reload of the devices table at a time (see `refresh_devices`).
    pub devices_reload: tokio::sync::Mutex<()>,
    /// Where the devices table comes from.
    pub registry: SharedRegistry,
    /// The gateway, once it is listening: the live connection state of
    /// connected devices (their last-seen time moves with every frame).
    pub gateway: std::sync::OnceLock<GatewayHandle>,
}

impl SqlService {
    /// Opens every declared stream and starts every rule, after a (re)start.
    pub async fn resume(&self) -> anyhow::Result<()> {
        for def in self.catalog.streams() {
            self.log
                .create_stream(&def)
                .await
                .with_context(|| format!("opening stream '{}'", def.name))?;
            self.sinks.start(&def)?;
        }
        for rule in self.catalog.rules() {
            if rule.paused {
                continue;
            }
            if let Err(e) = self.start_stored(&rule).await {
                tracing::error!(rule = %rule.name, error = %e, "rule could not be restarted");
                self.failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(rule.name.clone(), e.to_string());
            }
        }
        Ok(())
    }

    /// Compiles a rule from its stored SQL.
    async fn compile_stored(&self, rule: &RuleDef) -> tributary_sql::Result<CompiledRule> {
        let Statement::CreateRule(stmt) = parse(&rule.sql)? else {
            return Err(tributary_sql::Error::Internal(
                "stored rule is not a CREATE RULE".into(),
            ));
        };
        compile_rule_with_devices(&stmt, &self.catalog, &self.devices, rule.created_at).await
    }

    /// Reloads the devices table from the registry (after it changed).
    pub async fn refresh_devices(&self) -> anyhow::Result<()> {
        let registry = &self.registry;
        // One reload at a time, each reading the registry after the one
        // before it was applied: two concurrent reloads could otherwise
        // apply out of order and leave an older snapshot in place.
        let _one_at_a_time = self.devices_reload.lock().await;
        let devices = registry.all_devices().await?;
        let mut states = registry.connection_states().await?;
        if let Some(gateway) = self.gateway.get() {
            // Connected devices: the gateway's copy is the current one.
            states.extend(gateway.live_states());
        }
        let mut twins = registry.all_twins().await?;
        let rows: Vec<DeviceRow> = devices
            .into_iter()
            .map(|d| {
                let state = states.remove(&d.id);
                let twin = twins.remove(&d.id).unwrap_or_default();
                DeviceRow {
                    tags: d.tags,
                    status: match d.status {
                        DeviceStatus::Enabled => "enabled".into(),
                        DeviceStatus::Disabled => "disabled".into(),
                    },
                    metadata: serde_json::Value::Object(d.metadata).to_string(),
                    created_at: d.created_at,
                    updated_at: d.updated_at,
                    connected: state.as_ref().is_some_and(|s| s.connected),
                    last_seen: state.as_ref().and_then(|s| s.last_seen),
                    last_event_at: state.as_ref().and_then(|s| s.last_event_at),
                    properties: serde_json::Value::Object(twin.reported).to_string(),
                    desired: serde_json::Value::Object(twin.desired).to_string(),
                    id: d.id,
                }
            })
            .collect();
        self.devices.replace(&rows)?;
        Ok(())
    }

    async fn start_stored(&self, rule: &RuleDef) -> tributary_sql::Result<()> {
        let compiled = self.compile_stored(rule).await?;
        self.rules.start(rule, compiled.program)?;
        Ok(())
    }

    /// Executes one statement.
    pub async fn execute(&self, sql: &str) -> tributary_sql::Result<QueryResult> {
        let statement = parse(sql)?;
        let _ddl = match statement {
            Statement::CreateStream { .. }
            | Statement::CreateRule(_)
            | Statement::DropRule { .. }
            | Statement::PauseRule { .. }
            | Statement::ResumeRule { .. } => Some(self.ddl.lock().await),
            _ => None,
        };
        match statement {
            Statement::CreateStream { def, if_not_exists } => {
                if RESERVED_NAMES.contains(&def.name.as_str()) {
                    return Err(tributary_engine::Error::User(format!(
                        "'{}' is a built-in table; choose another stream name",
                        def.name
                    ))
                    .into());
                }
                if let Some(existing) = self.catalog.stream(&def.name) {
                    if if_not_exists {
                        return Ok(message(format!("stream {} already exists", existing.name)));
                    }
                    return Err(tributary_engine::Error::AlreadyExists {
                        kind: "stream",
                        name: def.name,
                    }
                    .into());
                }
                self.log.create_stream(&def).await?;
                self.catalog.add_stream(def.clone())?;
                self.sinks
                    .start(&def)
                    .map_err(|e| tributary_sql::Error::Storage(e.to_string()))?;
                Ok(message(format!("stream {} created", def.name)))
            }
            Statement::CreateRule(stmt) => self.create_rule(stmt).await,
            Statement::DropRule { name, if_exists } => {
                if self.catalog.rule(&name).is_none() && if_exists {
                    return Ok(message(format!("rule {name} does not exist")));
                }
                let source = self.catalog.rule(&name).map(|r| r.source);
                self.rules.remove(&name).await?;
                self.catalog.remove_rule(&name)?;
                // Its position no longer holds events back from retention.
                if let Some(source) = source {
                    self.log
                        .forget(&tributary_engine::rule::consumer_name(&name), &source)
                        .await?;
                }
                Ok(message(format!("rule {name} dropped")))
            }
            Statement::PauseRule { name } => {
                self.catalog.set_paused(&name, true)?;
                self.rules.stop(&name).await;
                Ok(message(format!(
                    "rule {name} paused; it resumes from where it stopped"
                )))
            }
            Statement::ResumeRule { name } => {
                let rule = self
                    .catalog
                    .rule(&name)
                    .ok_or(tributary_engine::Error::NotFound {
                        kind: "rule",
                        name: name.clone(),
                    })?;
                if self.rules.is_running(&name) {
                    return Ok(message(format!("rule {name} is already running")));
                }
                let compiled = self.compile_stored(&rule).await?;
                let rule = self.catalog.set_paused(&name, false)?;
                self.rules.start(&rule, compiled.program)?;
                Ok(message(format!("rule {name} resumed")))
            }
            Statement::ExplainRule { name } => {
                let rule = self
                    .catalog
                    .rule(&name)
                    .ok_or(tributary_engine::Error::NotFound {
                        kind: "rule",
                        name: name.clone(),
                    })?;
                let compiled = self.compile_stored(&rule).await?;
                let lines: Vec<String> = compiled
                    .explain
                    .iter()
                    .flat_map(|l| l.lines().map(str::to_string))
                    .collect();
                table(vec![text("plan", lines)])
            }
            Statement::ShowStreams => self.show_streams(),
            Statement::ShowRules => Ok(self.show_rules()),
            Statement::Describe { stream } => {
                let def =
                    self.catalog
                        .stream(&stream)
                        .ok_or(tributary_engine::Error::NotFound {
                            kind: "stream",
                            name: stream,
                        })?;
                Ok(describe(&def))
            }
            Statement::Query(statement) => {
                // A query sees the devices as they are now, last-seen times
                // included.
                if self.queries.reads_devices(&statement)
                    && let Err(e) = self.refresh_devices().await
                {
                    tracing::warn!(error = %e, "could not reload the devices table; querying the last copy");
                }
                self.queries.run(*statement).await
            }
        }
    }

    /// CREATE [OR REPLACE] RULE and CREATE STREAM ... AS SELECT: the rule is
    /// planned in full before anything is saved, so a refused statement
    /// leaves nothing behind.
    async fn create_rule(&self, stmt: RuleStatement) -> tributary_sql::Result<QueryResult> {
        let existing = self.catalog.rule(&stmt.name);
        if existing.is_some() && !stmt.or_replace {
            return Err(tributary_engine::Error::AlreadyExists {
                kind: "rule",
                name: stmt.name,
            }
            .into());
        }
        let mut compiled =
            compile_rule_with_devices(&stmt, &self.catalog, &self.devices, now_millis()).await?;
        for def in &compiled.new_streams {
            self.log.create_stream(def).await?;
        }
        let kind = if stmt.creates_stream.is_some() {
            "stream"
        } else {
            "rule"
        };
        let Some(old) = existing else {
            self.rules.position_at_end(&compiled.def).await?;
            self.catalog
                .put_rule(compiled.def.clone(), compiled.new_streams.clone())?;
            self.start_sinks(&compiled.new_streams)?;
            self.rules.start(&compiled.def, compiled.program)?;
            return Ok(message(format!(
                "{kind} {} created: reads {}, writes {}",
                compiled.def.name, compiled.def.source, compiled.def.target
            )));
        };
        // A replacement keeps the old rule's position (and paused state);
        // a rule that now reads another stream starts at that stream's end.
        compiled.def.paused = old.paused;
        if old.source != compiled.def.source {
            self.rules.position_at_end(&compiled.def).await?;
        }
        self.catalog
            .put_rule(compiled.def.clone(), compiled.new_streams.clone())?;
        self.start_sinks(&compiled.new_streams)?;
        let handover = self.rules.replace(&compiled.def, compiled.program).await?;
        if old.source != compiled.def.source {
            self.log
                .forget(
                    &tributary_engine::rule::consumer_name(&compiled.def.name),
                    &old.source,
                )
                .await?;
        }
        let how = match handover {
            Handover::StateKept => "its open windows carry over",
            Handover::Rebuilt
                if old.late_stream.is_none() && compiled.def.late_stream.is_none() =>
            {
                "it goes on from where the old one stopped"
            }
            Handover::Rebuilt => {
                "the new plan is not compatible with the old one's window state, so it rebuilds its windows from the events since the old rule's last commit"
            }
        };
        Ok(message(format!(
            "rule {} replaced; {how}",
            compiled.def.name
        )))
    }

    fn start_sinks(&self, streams: &[StreamDef]) -> tributary_sql::Result<()> {
        for def in streams {
            self.sinks
                .start(def)
                .map_err(|e| tributary_sql::Error::Storage(e.to_string()))?;
        }
        Ok(())
    }

    fn show_streams(&self) -> tributary_sql::Result<QueryResult> {
        let streams = self.catalog.streams();
        let mut events = Vec::with_capacity(streams.len());
        for s in &streams {
            let mut n = 0;
            for p in 0..s.partitions {
                n += self.log.end_offset(&s.name, p).unwrap_or(0);
            }
            events.push(n);
        }
        let columns: Vec<String> = streams
            .iter()
            .map(|s| {
                s.columns
                    .iter()
                    .map(|c| format!("{} {}", c.name, c.ty))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .collect();
        table(vec![
            text("name", streams.iter().map(|s| s.name.clone())),
            text("columns", columns),
            (
                Field::new("partitions", DataType::UInt64, false),
                Arc::new(UInt64Array::from_iter_values(
                    streams.iter().map(|s| u64::from(s.partitions)),
                )),
            ),
            (
                Field::new("events", DataType::UInt64, false),
                Arc::new(UInt64Array::from(events)),
            ),
        ])
    }

    fn show_rules(&self) -> QueryResult {
        let rules = self.catalog.rules();
        let failed = self
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let stats: Vec<_> = rules.iter().map(|r| self.rules.stats(&r.name)).collect();
        let count = |f: Counter| -> ArrayRef {
            Arc::new(UInt64Array::from(
                stats
                    .iter()
                    .map(|s| s.as_ref().map(f).unwrap_or(0))
                    .collect::<Vec<_>>(),
            ))
        };
        type Counter = fn(&tributary_engine::rule::RuleStatsSnapshot) -> u64;
        let counters: [(&str, Counter); 7] = [
            ("events_in", |s| s.events_in),
            ("rows_out", |s| s.rows_out),
            ("commands_queued", |s| s.commands_queued),
            ("late_events", |s| s.late_events),
            ("open_windows", |s| s.open_windows),
            ("state_bytes", |s| s.state_bytes),
            ("errors", |s| s.errors),
        ];
        let mut columns = vec![
            text("name", rules.iter().map(|r| r.name.clone())),
            text("source", rules.iter().map(|r| r.source.clone())),
            text("target", rules.iter().map(|r| r.target.to_string())),
            text(
                "status",
                rules.iter().zip(&stats).map(|(r, s)| {
                    match (r.paused, s) {
                        (true, _) => "paused",
                        (false, Some(_)) => "running",
                        (false, None) => "failed",
                    }
                    .to_string()
                }),
            ),
        ];
        columns.extend(
            counters
                .into_iter()
                .map(|(name, f)| (Field::new(name, DataType::UInt64, false), count(f))),
        );
        columns.extend([
            (
                Field::new("last_error", DataType::Utf8, true),
                Arc::new(StringArray::from(
                    rules
                        .iter()
                        .zip(&stats)
                        .map(|(r, s)| match s {
                            Some(s) => s.last_error.clone(),
                            None => failed.get(&r.name).cloned(),
                        })
                        .collect::<Vec<_>>(),
                )) as ArrayRef,
            ),
            text("sql", rules.iter().map(|r| r.sql.clone())),
        ]);
        // Every column is built from the same rules, so this cannot fail.
        table(columns).unwrap_or_else(|_| message("no rules".into()))
    }
}

fn text(name: &str, values: impl IntoIterator<Item = String>) -> (Field, ArrayRef) {
    (
        Field::new(name, DataType::Utf8, false),
        Arc::new(StringArray::from_iter_values(values)),
    )
}

fn table(columns: Vec<(Field, ArrayRef)>) -> tributary_sql::Result<QueryResult> {
    let (fields, arrays): (Vec<_>, Vec<_>) = columns.into_iter().unzip();
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), arrays)
        .map_err(|e| tributary_sql::Error::Internal(e.to_string()))?;
    Ok(QueryResult {
        schema,
        batches: vec![batch],
    })
}

/// A statement's one-line outcome, as a one-row `result` table.
pub fn message(text_value: String) -> QueryResult {
    let schema = Arc::new(Schema::new(vec![Field::new(
        "result",
        DataType::Utf8,
        false,
    )]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(StringArray::from(vec![text_value]))],
    );
    QueryResult {
        schema,
        batches: batch.into_iter().collect(),
    }
}

fn describe(def: &StreamDef) -> QueryResult {
    let schema = def.schema();
    let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    let types: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| match def.column(f.name()) {
            Some(c) => c.ty.sql_name().to_string(),
            None if f.name() == "device_id" => "VARCHAR".to_string(),
            None => "TIMESTAMP".to_string(),
        })
        .collect();
    let system: Vec<bool> = names
        .iter()
        .map(|n| SYSTEM_COLUMNS.contains(&n.as_str()))
        .collect();
    let nullable: Vec<bool> = schema.fields().iter().map(|f| f.is_nullable()).collect();
    table(vec![
        text("column", names),
        text("type", types),
        (
            Field::new("nullable", DataType::Boolean, false),
            Arc::new(BooleanArray::from(nullable)),
        ),
        (
            Field::new("system", DataType::Boolean, false),
            Arc::new(BooleanArray::from(system)),
        ),
    ])
    .unwrap_or_else(|e| message(e.to_string()))
}
