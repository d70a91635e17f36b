//! Parsing Tributary's statements.
//!
//! Tributary speaks DataFusion's SQL plus a few statements of its own:
//! `CREATE STREAM`, `CREATE RULE`, `SHOW STREAMS`, `SHOW RULES`, `DROP RULE`
//! and `DESCRIBE <stream>`. Our own keywords are recognised on tokens; the rest
//! of each statement goes through sqlparser, with the text laid out so that
//! every line and column in an error still points into what the user wrote.

use datafusion::sql::parser::{DFParser, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::{self, CreateTableOptions, SqlOption, TableObject};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion::sql::sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer};
use tributary_engine::catalog::RuleTarget;
use tributary_engine::event::{ColumnDef, ColumnType, DEFAULT_PARTITIONS, StreamDef};

use std::collections::BTreeMap;

use crate::error::{Error, Location, Result, location_in_message};
use crate::window::{IDLE_TIMEOUT, WATERMARK_DELAY, format_duration, parse_duration};
use tributary_engine::log::{RETENTION, RETENTION_BYTES};

/// The options `CREATE STREAM ... WITH (...)` takes, for error messages.
const STREAM_OPTIONS: &str =
    "partitions, watermark_delay, idle_timeout, retention and retention_bytes";

/// One parsed statement.
#[derive(Debug, Clone)]
pub enum Statement {
    /// `CREATE STREAM [IF NOT EXISTS] name (col TYPE, ...) [WITH (partitions = N)]`
    CreateStream { def: StreamDef, if_not_exists: bool },
    /// `CREATE RULE name AS INSERT INTO <commands | stream> SELECT ...`
    CreateRule(RuleStatement),
    /// `SHOW STREAMS`
    ShowStreams,
    /// `SHOW RULES`
    ShowRules,
    /// `DESCRIBE <stream>`
    Describe { stream: String },
    /// `DROP RULE [IF EXISTS] name`
    DropRule { name: String, if_exists: bool },
    /// `PAUSE RULE name`
    PauseRule { name: String },
    /// `RESUME RULE name`
    ResumeRule { name: String },
    /// `EXPLAIN RULE name`
    ExplainRule { name: String },
    /// A query: `SELECT`, `WITH`, `EXPLAIN`, `VALUES`.
    Query(Box<DfStatement>),
}

/// A parsed `CREATE RULE`.
#[derive(Debug, Clone)]
pub struct RuleStatement {
    pub name: String,
    pub target: RuleTarget,
    /// The rule's query, with positions relative to the original text.
    pub query: Box<ast::Query>,
    /// The whole statement as written.
    pub sql: String,
    /// `CREATE OR REPLACE RULE`.
    pub or_replace: bool,
    /// `CREATE STREAM name AS SELECT ...`: the rule also creates its target
    /// stream, with these options.
    pub creates_stream: Option<BTreeMap<String, String>>,
}

/// The statements Tributary understands, for error messages.
pub const SUPPORTED: &str = "SELECT, EXPLAIN, CREATE STREAM, CREATE [OR REPLACE] RULE, SHOW STREAMS, SHOW RULES, DESCRIBE <stream>, PAUSE RULE, RESUME RULE, EXPLAIN RULE, DROP RULE";

/// Parses one statement (a trailing `;` is allowed).
pub fn parse(sql: &str) -> Result<Statement> {
    parse_inner(sql).map_err(|e| match e {
        // "found: EOF" comes without a position: point past the last character.
        Error::Syntax {
            message,
            location: None,
        } if message.contains("EOF") => Error::Syntax {
            message: message.replace("found: EOF", "found the end of the statement"),
            location: Some(end_of(sql)),
        },
        other => other,
    })
}

/// The position just past the end of `sql`.
fn end_of(sql: &str) -> Location {
    let trimmed = sql.trim_end();
    let line = trimmed.lines().count().max(1) as u64;
    let last = trimmed.rsplit('\n').next().unwrap_or("");
    Location {
        line,
        column: last.chars().count() as u64 + 1,
    }
}

fn parse_inner(sql: &str) -> Result<Statement> {
    let tokens = tokenize(sql)?;
    let words: Vec<String> = tokens
        .iter()
        .take(4)
        .map(|t| word_upper(&t.token))
        .collect();
    let w = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
    match (w(0), w(1)) {
        ("", _) => Err(Error::Syntax {
            message: format!("empty statement; expected one of {SUPPORTED}"),
            location: None,
        }),
        ("CREATE", "STREAM") => parse_create_stream(sql, &tokens),
        ("CREATE", "RULE") => parse_create_rule(sql, &tokens, 2),
        ("CREATE", "OR") if w(2) == "REPLACE" && w(3) == "RULE" => {
            parse_create_rule(sql, &tokens, 4)
        }
        ("PAUSE", "RULE") => {
            let name = ident_at(&tokens, 2, "a rule name after PAUSE RULE")?;
            expect_end(&tokens, 3)?;
            Ok(Statement::PauseRule { name })
        }
        ("RESUME", "RULE") => {
            let name = ident_at(&tokens, 2, "a rule name after RESUME RULE")?;
            expect_end(&tokens, 3)?;
            Ok(Statement::ResumeRule { name })
        }
        ("EXPLAIN", "RULE") => {
            let name = ident_at(&tokens, 2, "a rule name after EXPLAIN RULE")?;
            expect_end(&tokens, 3)?;
            Ok(Statement::ExplainRule { name })
        }
        ("SHOW", "STREAMS") => expect_end(&tokens, 2).map(|()| Statement::ShowStreams),
        ("SHOW", "RULES") => expect_end(&tokens, 2).map(|()| Statement::ShowRules),
        ("DESCRIBE", _) | ("DESC", _) => {
            let stream = ident_at(&tokens, 1, "a stream name after DESCRIBE")?;
            expect_end(&tokens, 2)?;
            Ok(Statement::Describe { stream })
        }
        ("DROP", "RULE") => {
            let if_exists = w(2) == "IF";
            let at = if if_exists {
                if word_upper(&tokens.get(3).map(|t| t.token.clone()).unwrap_or(Token::EOF))
                    != "EXISTS"
                {
                    return Err(unexpected(&tokens, 3, "EXISTS after DROP RULE IF"));
                }
                4
            } else {
                2
            };
            let name = ident_at(&tokens, at, "a rule name after DROP RULE")?;
            expect_end(&tokens, at + 1)?;
            Ok(Statement::DropRule { name, if_exists })
        }
        ("DROP", "STREAM") => Err(Error::plan(
            "DROP STREAM is not supported yet: a stream's events stay in the log and in Parquet",
        )),
        _ => parse_query(sql),
    }
}

/// The tokens of `sql` without whitespace and comments, each with its position.
fn tokenize(sql: &str) -> Result<Vec<TokenWithSpan>> {
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize_with_location()
        .map_err(|e| Error::Syntax {
            message: e.message.clone(),
            location: Some(Location {
                line: e.location.line,
                column: e.location.column,
            }),
        })?;
    Ok(tokens
        .into_iter()
        .filter(|t| !matches!(t.token, Token::Whitespace(_)))
        .collect())
}

fn word_upper(t: &Token) -> String {
    match t {
        Token::Word(w) if w.quote_style.is_none() => w.value.to_ascii_uppercase(),
        _ => String::new(),
    }
}

fn location_of(t: &TokenWithSpan) -> Location {
    Location {
        line: t.span.start.line,
        column: t.span.start.column,
    }
}

fn unexpected(tokens: &[TokenWithSpan], i: usize, expected: &str) -> Error {
    match tokens.get(i) {
        Some(t) if t.token != Token::EOF => Error::Syntax {
            message: format!("expected {expected}, found '{}'", t.token),
            location: Some(location_of(t)),
        },
        _ => Error::Syntax {
            message: format!("expected {expected}, found the end of the statement"),
            location: tokens.last().map(location_of),
        },
    }
}

fn ident_at(tokens: &[TokenWithSpan], i: usize, expected: &str) -> Result<String> {
    match tokens.get(i).map(|t| &t.token) {
        Some(Token::Word(w)) => Ok(if w.quote_style.is_some() {
            w.value.clone()
        } else {
            w.value.to_ascii_lowercase()
        }),
        _ => Err(unexpected(tokens, i, expected)),
    }
}

fn expect_end(tokens: &[TokenWithSpan], i: usize) -> Result<()> {
    let rest: Vec<_> = tokens[i.min(tokens.len())..]
        .iter()
        .filter(|t| !matches!(t.token, Token::SemiColon | Token::EOF))
        .collect();
    match rest.first() {
        None => Ok(()),
        Some(t) => Err(Error::Syntax {
            message: format!("unexpected '{}' after the end of the statement", t.token),
            location: Some(location_of(t)),
        }),
    }
}

/// Byte offset of a 1-based line/column position in `sql`.
fn byte_offset(sql: &str, loc: Location) -> usize {
    let mut line = 1;
    let mut column = 1;
    for (i, c) in sql.char_indices() {
        if line == loc.line && column == loc.column {
            return i;
        }
        if c == '\n' {
            line += 1;
            column = 1;
        } else {
            column += 1;
        }
    }
    sql.len()
}

/// `sql` with everything before byte `end` blanked out (newlines kept), so a
/// parser that starts there reports positions in the user's own text.
fn blank_before(sql: &str, end: usize) -> String {
    let mut out: String = sql[..end]
        .chars()
        .map(|c| if c == '\n' { '\n' } else { ' ' })
        .collect();
    out.push_str(&sql[end..]);
    out
}

fn parse_one(sql: &str) -> Result<ast::Statement> {
    let mut parser = Parser::new(&GenericDialect {})
        .try_with_sql(sql)
        .map_err(parser_error)?;
    let statement = parser.parse_statement().map_err(parser_error)?;
    while parser.consume_token(&Token::SemiColon) {}
    let next = parser.peek_token();
    if next.token != Token::EOF {
        return Err(Error::Syntax {
            message: format!("unexpected '{}' after the end of the statement", next.token),
            location: Some(location_of(&next)),
        });
    }
    Ok(statement)
}

fn parser_error(e: datafusion::sql::sqlparser::parser::ParserError) -> Error {
    let message = e.to_string();
    let message = message
        .strip_prefix("sql parser error: ")
        .unwrap_or(&message)
        .to_string();
    let location = location_in_message(&message);
    let message = match message.rfind(" at Line: ") {
        Some(i) => message[..i].to_string(),
        None => message,
    };
    Error::Syntax { message, location }
}

fn parse_create_stream(sql: &str, tokens: &[TokenWithSpan]) -> Result<Statement> {
    // `STREAM` and `TABLE ` have the same length: swap them and let sqlparser
    // read a CREATE TABLE, positions unchanged.
    let stream_kw = &tokens[1];
    let at = byte_offset(sql, location_of(stream_kw));
    let mut text = sql.to_string();
    text.replace_range(at..at + "STREAM".len(), "TABLE ");
    let ast::Statement::CreateTable(ct) = parse_one(&text)? else {
        return Err(Error::Syntax {
            message: "expected CREATE STREAM name (column TYPE, ...)".into(),
            location: Some(location_of(stream_kw)),
        });
    };
    let name = object_name(&ct.name)?;
    let mut columns = Vec::with_capacity(ct.columns.len());
    for c in &ct.columns {
        let location = Some(Location {
            line: c.name.span.start.line,
            column: c.name.span.start.column,
        })
        .filter(|l| l.line > 0);
        if !c.options.is_empty() {
            return Err(Error::Plan {
                message: format!(
                    "column '{}': constraints and defaults are not supported; every column is nullable",
                    c.name.value
                ),
                location,
            });
        }
        let ty = column_type(&c.data_type).ok_or_else(|| Error::Plan {
            message: format!(
                "column '{}': unsupported type {}; use BOOLEAN, INT, BIGINT, REAL, DOUBLE, VARCHAR or TIMESTAMP",
                c.name.value, c.data_type
            ),
            location,
        })?;
        columns.push(ColumnDef {
            name: ident(&c.name),
            ty,
        });
    }
    let options = match &ct.table_options {
        CreateTableOptions::None => vec![],
        CreateTableOptions::With(o) => o.clone(),
        other => {
            return Err(Error::plan(format!(
                "unsupported stream options {other}; use WITH (partitions = N, watermark_delay = '5s', idle_timeout = '1m')"
            )));
        }
    };
    let mut partitions = DEFAULT_PARTITIONS;
    let mut kept = BTreeMap::new();
    for option in options {
        match option {
            SqlOption::KeyValue { key, value } => {
                let k = key.value.to_ascii_lowercase();
                let text = value.to_string().trim_matches('\'').to_string();
                let location = Some(Location {
                    line: key.span.start.line,
                    column: key.span.start.column,
                })
                .filter(|l| l.line > 0);
                match k.as_str() {
                    "partitions" => {
                        partitions = text.parse().map_err(|_| Error::Plan {
                            message: format!("partitions must be a whole number, got {value}"),
                            location,
                        })?;
                    }
                    WATERMARK_DELAY | IDLE_TIMEOUT => {
                        let ms = parse_duration(&text).map_err(|e| Error::Plan {
                            message: format!("{k}: {e}"),
                            location,
                        })?;
                        if k == IDLE_TIMEOUT && ms == 0 {
                            return Err(Error::Plan {
                                message: "idle_timeout must be more than 0".into(),
                                location,
                            });
                        }
                        kept.insert(k, format_duration(ms));
                    }
                    RETENTION => {
                        let ms = parse_duration(&text).map_err(|e| Error::Plan {
                            message: format!("{k}: {e}"),
                            location,
                        })?;
                        kept.insert(k, format_duration(ms));
                    }
                    RETENTION_BYTES => {
                        let bytes: u64 = text.parse().map_err(|_| Error::Plan {
                            message: format!(
                                "retention_bytes must be a whole number of bytes, got {value}"
                            ),
                            location,
                        })?;
                        kept.insert(k, bytes.to_string());
                    }
                    _ => {
                        return Err(Error::Plan {
                            message: format!(
                                "unknown stream option '{k}'; the options are {STREAM_OPTIONS}"
                            ),
                            location,
                        });
                    }
                }
            }
            other => {
                return Err(Error::plan(format!(
                    "unknown stream option {other}; the options are {STREAM_OPTIONS}"
                )));
            }
        }
    }
    if let Some(query) = &ct.query {
        if !ct.columns.is_empty() {
            return Err(Error::plan(
                "a derived stream takes its columns from its query: CREATE STREAM name AS SELECT ...",
            ));
        }
        // Validate the name and options the way a declared stream would be.
        StreamDef::new(&name, Vec::new(), partitions)?;
        kept.insert("partitions".into(), partitions.to_string());
        return Ok(Statement::CreateRule(RuleStatement {
            name: name.clone(),
            target: RuleTarget::Stream(name),
            query: query.clone(),
            sql: sql.trim().trim_end_matches(';').trim().to_string(),
            or_replace: false,
            creates_stream: Some(kept),
        }));
    }
    let mut def = StreamDef::new(&name, columns, partitions)?;
    def.options = kept;
    Ok(Statement::CreateStream {
        def,
        if_not_exists: ct.if_not_exists,
    })
}

/// Maps a declared SQL type to a column type, the way DataFusion names them.
fn column_type(t: &ast::DataType) -> Option<ColumnType> {
    let name = t.to_string().to_ascii_uppercase();
    let base = name.split('(').next().unwrap_or("").trim();
    Some(match base {
        "BOOLEAN" | "BOOL" => ColumnType::Boolean,
        "INT" | "INTEGER" | "INT4" | "INT32" => ColumnType::Int32,
        "BIGINT" | "INT8" | "INT64" => ColumnType::Int64,
        "REAL" | "FLOAT" | "FLOAT4" | "FLOAT32" => ColumnType::Float32,
        "DOUBLE" | "DOUBLE PRECISION" | "FLOAT8" | "FLOAT64" => ColumnType::Float64,
        "VARCHAR" | "TEXT" | "STRING" | "CHARACTER VARYING" => ColumnType::Utf8,
        "TIMESTAMP" | "TIMESTAMPTZ" | "TIMESTAMP WITH TIME ZONE" => ColumnType::Timestamp,
        _ => return None,
    })
}

/// Identifiers fold to lower case unless quoted, as in DataFusion.
fn ident(i: &ast::Ident) -> String {
    if i.quote_style.is_some() {
        i.value.clone()
    } else {
        i.value.to_ascii_lowercase()
    }
}

fn object_name(name: &ast::ObjectName) -> Result<String> {
    match name.0.as_slice() {
        [part] => part
            .as_ident()
            .map(ident)
            .ok_or_else(|| Error::plan(format!("invalid name {name}"))),
        _ => Err(Error::plan(format!(
            "'{name}': stream and rule names have one part, without a schema"
        ))),
    }
}

/// `CREATE [OR REPLACE] RULE name AS INSERT ...`; the name is token `at`.
fn parse_create_rule(sql: &str, tokens: &[TokenWithSpan], at: usize) -> Result<Statement> {
    let name = ident_at(tokens, at, "a rule name after CREATE RULE")?;
    if word_upper(
        &tokens
            .get(at + 1)
            .map(|t| t.token.clone())
            .unwrap_or(Token::EOF),
    ) != "AS"
    {
        return Err(unexpected(tokens, at + 1, "AS after the rule name"));
    }
    let Some(body) = tokens.get(at + 2).filter(|t| t.token != Token::EOF) else {
        return Err(unexpected(
            tokens,
            at + 2,
            "INSERT INTO ... SELECT ... after AS",
        ));
    };
    let start = byte_offset(sql, location_of(body));
    let statement = parse_one(&blank_before(sql, start))?;
    let ast::Statement::Insert(insert) = statement else {
        return Err(Error::Syntax {
            message: "a rule is CREATE RULE name AS INSERT INTO <commands | stream> SELECT ..."
                .into(),
            location: Some(location_of(body)),
        });
    };
    let TableObject::TableName(table) = &insert.table else {
        return Err(Error::plan("a rule inserts into `commands` or a stream"));
    };
    if !insert.columns.is_empty() {
        return Err(Error::plan(
            "a rule's INSERT takes no column list: columns are matched by position",
        ));
    }
    let target = match object_name(table)?.as_str() {
        "commands" => RuleTarget::Commands,
        other => RuleTarget::Stream(other.to_string()),
    };
    let query = insert
        .source
        .clone()
        .ok_or_else(|| Error::plan("a rule needs a SELECT after INSERT INTO"))?;
    Ok(Statement::CreateRule(RuleStatement {
        name,
        target,
        query,
        sql: sql.trim().trim_end_matches(';').trim().to_string(),
        or_replace: at == 4,
        creates_stream: None,
    }))
}

fn parse_query(sql: &str) -> Result<Statement> {
    let mut statements = DFParser::parse_sql_with_dialect(sql, &GenericDialect {})?;
    if statements.len() != 1 {
        return Err(Error::Syntax {
            message: format!("expected one statement, found {}", statements.len()),
            location: None,
        });
    }
    let statement = statements
        .pop_front()
        .ok_or_else(|| Error::Internal("parser returned no statement".into()))?;
    match &statement {
        DfStatement::Statement(s)
            if matches!(
                **s,
                ast::Statement::Query(_) | ast::Statement::Explain { .. }
            ) =>
        {
            Ok(Statement::Query(Box::new(statement)))
        }
        DfStatement::Explain(_) => Ok(Statement::Query(Box::new(statement))),
        other => {
            let text = other.to_string();
            let first: String = text
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ");
            Err(Error::plan(format!(
                "'{first} ...' is not supported; Tributary understands {SUPPORTED}"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_stream_with_types_and_options() {
        let Statement::CreateStream { def, if_not_exists } = parse(
            "create stream Telemetry (temp DOUBLE, humidity double precision, n BIGINT, ok BOOLEAN, label VARCHAR(20), at TIMESTAMP) WITH (partitions = 2);",
        )
        .unwrap() else {
            panic!("not a stream")
        };
        assert!(!if_not_exists);
        assert_eq!(def.name, "telemetry");
        assert_eq!(def.partitions, 2);
        let types: Vec<_> = def.columns.iter().map(|c| c.ty).collect();
        assert_eq!(
            types,
            [
                ColumnType::Float64,
                ColumnType::Float64,
                ColumnType::Int64,
                ColumnType::Boolean,
                ColumnType::Utf8,
                ColumnType::Timestamp
            ]
        );
    }

    #[test]
    fn retention_options_are_checked_and_kept() {
        let Statement::CreateStream { def, .. } = parse(
            "CREATE STREAM t (x DOUBLE) WITH (retention = '90 minutes', retention_bytes = 1048576)",
        )
        .unwrap() else {
            panic!("not a stream")
        };
        assert_eq!(def.options.get(RETENTION).map(String::as_str), Some("90m"));
        assert_eq!(
            def.options.get(RETENTION_BYTES).map(String::as_str),
            Some("1048576")
        );
        let err = parse("CREATE STREAM t (x DOUBLE) WITH (retention = 'soon')").unwrap_err();
        assert!(err.to_string().contains("retention"), "{err}");
        assert!(err.location().is_some(), "{err}");
        let err = parse("CREATE STREAM t (x DOUBLE) WITH (retention_bytes = '1 GB')").unwrap_err();
        assert!(err.to_string().contains("whole number of bytes"), "{err}");
        let err = parse("CREATE STREAM t (x DOUBLE) WITH (ttl = '1h')").unwrap_err();
        assert!(err.to_string().contains("retention_bytes"), "{err}");
    }

    #[test]
    fn syntax_errors_point_into_the_original_text() {
        let err = parse("CREATE STREAM t (temp DOUBLE,\n  humidity )").unwrap_err();
        assert_eq!(err.location().map(|l| l.line), Some(2), "{err}");
        let err = parse("CREATE RULE r AS INSERT INTO commands SELEC x FROM t").unwrap_err();
        assert_eq!(
            err.location(),
            Some(Location {
                line: 1,
                column: 39
            }),
            "{err}"
        );
        let err = parse("SELECT * FROM").unwrap_err();
        assert!(matches!(err, Error::Syntax { .. }), "{err}");
        assert_eq!(
            err.location(),
            Some(Location {
                line: 1,
                column: 14
            }),
            "{err}"
        );
        assert!(err.to_string().contains("end of the statement"), "{err}");
    }

    #[test]
    fn unsupported_types_and_statements_say_what_to_use() {
        let err = parse("CREATE STREAM t (x BLOB)").unwrap_err();
        assert!(err.to_string().contains("unsupported type BLOB"), "{err}");
        assert_eq!(
            err.location(),
            Some(Location {
                line: 1,
                column: 18
            })
        );
        let err = parse("DELETE FROM t").unwrap_err();
        assert!(err.to_string().contains("not supported"), "{err}");
        assert!(parse("").is_err());
    }

    #[test]
    fn rules_show_drop_describe() {
        let Statement::CreateRule(r) = parse(
            "CREATE RULE hot AS INSERT INTO commands SELECT device_id, 'fan_on' AS name, CAST(temp AS VARCHAR) AS payload FROM telemetry WHERE temp > 80;",
        )
        .unwrap() else {
            panic!("not a rule")
        };
        assert_eq!(r.name, "hot");
        assert_eq!(r.target, RuleTarget::Commands);
        assert!(r.sql.ends_with("temp > 80"));
        assert!(matches!(parse("show rules").unwrap(), Statement::ShowRules));
        assert!(matches!(
            parse("SHOW STREAMS;").unwrap(),
            Statement::ShowStreams
        ));
        assert!(matches!(
            parse("DROP RULE IF EXISTS hot").unwrap(),
            Statement::DropRule {
                if_exists: true,
                ..
            }
        ));
        assert!(matches!(
            parse("DESCRIBE telemetry").unwrap(),
            Statement::Describe { .. }
        ));
        assert!(parse("SHOW RULES extra").is_err());
        assert!(matches!(parse("SELECT 1").unwrap(), Statement::Query(_)));
    }
}
