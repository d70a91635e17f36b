//! Finding `tumble(...)`, `hop(...)` or `session(...)` in a rule's GROUP BY
//! and turning it into the `window_start`, `window_end` columns the rest of
//! the query is planned against.

use datafusion::common::ScalarValue;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::{
    self, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, SetExpr, Spanned,
};

use crate::error::{Error, Location, Result};
use crate::window::{WindowSpec, parse_duration};

/// The columns a window adds to the rule's source.
pub const WINDOW_START: &str = "window_start";
pub const WINDOW_END: &str = "window_end";

/// A window call found in GROUP BY, not yet evaluated.
pub struct WindowCall {
    kind: String,
    args: Vec<ast::Expr>,
    pub location: Option<Location>,
}

fn span_location(span: datafusion::sql::sqlparser::tokenizer::Span) -> Option<Location> {
    (span.start.line > 0).then_some(Location {
        line: span.start.line,
        column: span.start.column,
    })
}

/// Where the query's grouping (or, without one, its select list) starts, for
/// errors about aggregates.
pub fn grouping_location(query: &ast::Query) -> Option<Location> {
    let SetExpr::Select(select) = query.body.as_ref() else {
        return None;
    };
    if let GroupByExpr::Expressions(exprs, _) = &select.group_by
        && let Some(first) = exprs.first()
    {
        return span_location(first.span());
    }
    select
        .projection
        .first()
        .and_then(|p| span_location(p.span()))
}

/// Takes the window call out of the query's GROUP BY, putting `window_start,
/// window_end` in its place.
pub fn take_window(query: &mut ast::Query) -> Result<Option<WindowCall>> {
    let SetExpr::Select(select) = query.body.as_mut() else {
        return Ok(None);
    };
    let GroupByExpr::Expressions(exprs, _) = &mut select.group_by else {
        return Ok(None);
    };
    let mut found: Option<(usize, WindowCall)> = None;
    for (i, e) in exprs.iter().enumerate() {
        let ast::Expr::Function(f) = e else { continue };
        let kind = f.name.to_string().to_ascii_lowercase();
        if !matches!(kind.as_str(), "tumble" | "hop" | "session") {
            continue;
        }
        let at = span_location(e.span());
        if found.is_some() {
            return Err(Error::Plan {
                message: "a rule groups by one window; remove the second one".into(),
                location: at,
            });
        }
        let FunctionArguments::List(list) = &f.args else {
            return Err(Error::Plan {
                message: format!("{kind}(...) needs arguments: {}", usage(&kind)),
                location: at,
            });
        };
        let mut args = Vec::new();
        for a in &list.args {
            match a {
                FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => args.push(e.clone()),
                _ => {
                    return Err(Error::Plan {
                        message: format!("{kind}: unexpected argument {a}; {}", usage(&kind)),
                        location: at,
                    });
                }
            }
        }
        found = Some((
            i,
            WindowCall {
                kind,
                args,
                location: at,
            },
        ));
    }
    let Some((i, call)) = found else {
        return Ok(None);
    };
    exprs.splice(
        i..=i,
        [
            ast::Expr::Identifier(ast::Ident::new(WINDOW_START)),
            ast::Expr::Identifier(ast::Ident::new(WINDOW_END)),
        ],
    );
    Ok(Some(call))
}

fn usage(kind: &str) -> &'static str {
    match kind {
        "tumble" => "write tumble(ts, INTERVAL '10' SECOND)",
        "hop" => "write hop(ts, INTERVAL '5' SECOND, INTERVAL '1' MINUTE) (slide, then size)",
        _ => "write session(ts, INTERVAL '30' SECOND) (the gap that ends a session)",
    }
}

impl WindowCall {
    /// Checks the arguments and evaluates the intervals.
    pub async fn evaluate(&self, ctx: &SessionContext) -> Result<WindowSpec> {
        let kind = self.kind.as_str();
        let wanted = if kind == "hop" { 3 } else { 2 };
        let fail = |message: String| Error::Plan {
            message,
            location: self.location,
        };
        if self.args.len() != wanted {
            return Err(fail(format!(
                "{kind} takes {wanted} arguments, got {}; {}",
                self.args.len(),
                usage(kind)
            )));
        }
        let time = match &self.args[0] {
            ast::Expr::Identifier(i) => i.value.to_ascii_lowercase(),
            ast::Expr::CompoundIdentifier(parts) => parts
                .last()
                .map(|i| i.value.to_ascii_lowercase())
                .unwrap_or_default(),
            _ => String::new(),
        };
        if time != "ts" {
            return Err(fail(format!(
                "{kind}: windows are over event time, so the first argument is `ts`, not {}",
                self.args[0]
            )));
        }
        let mut ms = Vec::new();
        for arg in &self.args[1..] {
            let value = interval_ms(ctx, arg).await.map_err(|e| Error::Plan {
                message: format!("{kind}: {e}; {}", usage(kind)),
                location: span_location(arg.span()).or(self.location),
            })?;
            ms.push(value);
        }
        Ok(match kind {
            "tumble" => WindowSpec::Tumble { size: ms[0] },
            "session" => WindowSpec::Session { gap: ms[0] },
            _ => {
                let (slide, size) = (ms[0], ms[1]);
                if size % slide != 0 {
                    return Err(fail(format!(
                        "hop: the size ({size} ms) must be a whole number of slides ({slide} ms)"
                    )));
                }
                if size / slide > 1_000 {
                    return Err(fail(format!(
                        "hop: an event would be in {} windows; keep size / slide at most 1000",
                        size / slide
                    )));
                }
                if slide == size {
                    WindowSpec::Tumble { size }
                } else {
                    WindowSpec::Hop { slide, size }
                }
            }
        })
    }
}

/// The length of a constant interval (or a duration string), in ms.
async fn interval_ms(ctx: &SessionContext, arg: &ast::Expr) -> std::result::Result<i64, String> {
    if let ast::Expr::Value(v) = arg
        && let ast::Value::SingleQuotedString(s) = &v.value
    {
        return positive(parse_duration(s)?, arg);
    }
    let state = ctx.state();
    let plan = state
        .create_logical_plan(&format!("SELECT {arg}"))
        .await
        .and_then(|p| state.optimize(&p))
        .map_err(|e| format!("{arg} is not a constant interval ({e})"))?;
    let LogicalPlan::Projection(p) = plan else {
        return Err(format!("{arg} is not a constant interval"));
    };
    let value = match p.expr.first().cloned().map(|e| e.unalias()) {
        Some(Expr::Literal(v, _)) => v,
        _ => return Err(format!("{arg} is not a constant interval")),
    };
    let ms = match value {
        ScalarValue::IntervalMonthDayNano(Some(v)) if v.months == 0 => {
            i64::from(v.days) * 86_400_000 + v.nanoseconds / 1_000_000
        }
        ScalarValue::IntervalDayTime(Some(v)) => {
            i64::from(v.days) * 86_400_000 + i64::from(v.milliseconds)
        }
        ScalarValue::IntervalMonthDayNano(Some(_)) | ScalarValue::IntervalYearMonth(Some(_)) => {
            return Err(format!(
                "{arg} is counted in months, which have no fixed length; use days"
            ));
        }
        other => return Err(format!("{arg} is a {}, not an interval", other.data_type())),
    };
    positive(ms, arg)
}

fn positive(ms: i64, arg: &ast::Expr) -> std::result::Result<i64, String> {
    if ms <= 0 {
        return Err(format!("{arg} must be longer than 0 ms"));
    }
    Ok(ms)
}
