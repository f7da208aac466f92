//! `transform`: shapes tabular data between pipeline steps without code.
//!
//! Input is `records` (a list of objects) or `csv` (text with a header row;
//! cells that parse as numbers become numbers). Steps run in a fixed order:
//! `filter` (all conditions must hold), `map` (computed fields), `select`
//! (keep these fields, in this order), `aggregate` (group and reduce). The
//! language is documented in docs/plugins.md.
//!
//! Hostile programs: every step charges what it builds against
//! `max_work_bytes` (an estimate of the records' memory) before building
//! it, so a program that would need gigabytes (a long constant copied into
//! every record, groups times fields, a long `select` list) fails at once
//! instead of taking the agent's memory; and every loop over the records
//! checks the task's cancel flag and deadline, so a timed-out transform
//! stops computing. CSV output is measured cell by cell as it is built,
//! against `max_output_bytes` (what one result can carry) and the same
//! budget, so a few records with fields of their own (rows x columns
//! cells) fail with `TooLarge` instead of building gigabytes of text.

use super::schema::Schema;
use super::util::{cfg_u64, Stop};
use super::{check_keys, Plugin, PluginError, TaskContext};
use crate::protocol::Value;
use async_trait::async_trait;
use serde_json::{Map, Value as J};
use std::collections::HashSet;

const NAME: &str = "transform";

/// The transform plugin.
#[derive(Debug)]
pub struct Transform {
    max_records: usize,
    max_work_bytes: usize,
    /// Longest CSV text a task may produce (one result must carry it).
    max_output_bytes: usize,
}

/// The default `max_output_bytes`: the default MQTT payload limit (the
/// agent sets it from `mqtt.max_payload_bytes`).
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 1 << 20;

/// Estimated memory of one JSON value (serde_json's enum) and of one map
/// entry beyond its key's text and its value: a few words each.
const VALUE: usize = 32;
const ENTRY: usize = 48;

/// Estimated memory of `v`, nested values included.
fn cost(v: &J) -> usize {
    match v {
        J::String(s) => VALUE + s.len(),
        J::Array(a) => VALUE + a.iter().map(cost).sum::<usize>(),
        J::Object(o) => rec_cost(o),
        _ => VALUE,
    }
}

fn rec_cost(r: &Rec) -> usize {
    VALUE
        + r.iter()
            .map(|(k, v)| ENTRY + k.len() + cost(v))
            .sum::<usize>()
}

/// What a run may still build, and whether it should stop.
struct Budget<'a> {
    used: usize,
    max: usize,
    stop: &'a Stop,
}

impl Budget<'_> {
    /// Takes `n` bytes for what `field` is about to build.
    fn charge(&mut self, field: &str, n: usize) -> Result<(), PluginError> {
        self.used = self.used.saturating_add(n);
        if self.used > self.max {
            return Err(err(
                field,
                format!(
                    "the records would need more than max_work_bytes ({} bytes, an estimate of their memory); \
                     use fewer records, fields or groups, or raise max_work_bytes",
                    self.max
                ),
            ));
        }
        Ok(())
    }

    fn give_back(&mut self, n: usize) {
        self.used = self.used.saturating_sub(n);
    }

    /// Between two records: stops once the task is cancelled or past its deadline.
    fn tick(&self) -> Result<(), PluginError> {
        self.stop.check(NAME)
    }
}

type Rec = Map<String, J>;

fn err(field: &str, message: impl Into<String>) -> PluginError {
    super::util::invalid(NAME, field, message)
}

impl Transform {
    /// Config keys: `max_records` (default 100000), `max_work_bytes`
    /// (default 64 MiB), `max_output_bytes` (the longest CSV text; default
    /// 1 MiB, the MQTT payload limit, which the agent puts here).
    pub fn from_config(config: &toml::Table) -> Result<Transform, PluginError> {
        check_keys(
            NAME,
            config,
            &["max_records", "max_work_bytes", "max_output_bytes"],
        )?;
        Ok(Transform {
            max_records: cfg_u64(NAME, config, "max_records", 100_000, 1, 10_000_000)? as usize,
            max_work_bytes: cfg_u64(NAME, config, "max_work_bytes", 64 << 20, 1 << 16, 1 << 36)?
                as usize,
            max_output_bytes: cfg_u64(
                NAME,
                config,
                "max_output_bytes",
                DEFAULT_MAX_OUTPUT_BYTES,
                1024,
                1 << 30,
            )? as usize,
        })
    }

    /// Runs the whole pipeline on a JSON input.
    pub fn run(&self, input: &J) -> Result<J, PluginError> {
        self.run_until(input, &Stop::never())
    }

    /// Runs the pipeline, giving up with `Cancelled` once `stop` says so.
    fn run_until(&self, input: &J, stop: &Stop) -> Result<J, PluginError> {
        let mut budget = Budget {
            used: 0,
            max: self.max_work_bytes,
            stop,
        };
        let b = &mut budget;
        let obj = input
            .as_object()
            .ok_or_else(|| err("input", "expected an object"))?;
        for k in obj.keys() {
            if ![
                "records",
                "csv",
                "filter",
                "map",
                "select",
                "aggregate",
                "format",
            ]
            .contains(&k.as_str())
            {
                return Err(err(
                    k,
                    "unknown field (known: records, csv, filter, map, select, aggregate, format)",
                ));
            }
        }
        // serde_json maps sort their keys: track the column order separately
        // (CSV header, then mapped fields, or the `select` list).
        let mut columns: Vec<String> = Vec::new();
        let mut recs = match (obj.get("records"), obj.get("csv")) {
            (Some(J::Array(a)), None) => {
                if a.len() > self.max_records {
                    return Err(err(
                        "records",
                        format!(
                            "{} records, more than max_records ({})",
                            a.len(),
                            self.max_records
                        ),
                    ));
                }
                a.iter()
                    .enumerate()
                    .map(|(i, r)| match r {
                        J::Object(o) => {
                            b.charge("records", rec_cost(o))?;
                            Ok(o.clone())
                        }
                        _ => Err(err(&format!("records[{i}]"), "expected an object")),
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
            (None, Some(J::String(s))) => {
                let (header, recs) = parse_csv(s, self.max_records, b)?;
                columns = header;
                recs
            }
            (Some(_), None) => return Err(err("records", "expected a list of objects")),
            (None, Some(_)) => return Err(err("csv", "expected CSV text")),
            _ => {
                return Err(err(
                    "records",
                    "give exactly one of `records` (list of objects) or `csv` (text)",
                ))
            }
        };
        if recs.len() > self.max_records {
            return Err(err(
                "records",
                format!(
                    "{} records, more than max_records ({})",
                    recs.len(),
                    self.max_records
                ),
            ));
        }
        if let Some(f) = obj.get("filter") {
            let conds = parse_filter(f)?;
            let mut kept = Vec::with_capacity(recs.len());
            for r in recs {
                b.tick()?;
                if conds.iter().all(|c| c.holds(&r)) {
                    kept.push(r);
                } else {
                    b.give_back(rec_cost(&r));
                }
            }
            recs = kept;
        }
        if let Some(m) = obj.get("map") {
            apply_map(m, &mut recs, b)?;
            if let Some(m) = m.as_object() {
                for k in m.keys() {
                    if !columns.contains(k) {
                        columns.push(k.clone());
                    }
                }
            }
        }
        if let Some(s) = obj.get("select") {
            let fields: Vec<String> = match s {
                J::Array(a) => a
                    .iter()
                    .map(|f| f.as_str().map(String::from))
                    .collect::<Option<_>>()
                    .ok_or_else(|| err("select", "expected a list of field names"))?,
                _ => return Err(err("select", "expected a list of field names")),
            };
            columns = fields.clone();
            // The fixed part of every new record, checked once up front.
            let per_record = VALUE
                + fields
                    .iter()
                    .map(|f| ENTRY + f.len() + VALUE)
                    .sum::<usize>();
            if per_record.saturating_mul(recs.len()) > b.max.saturating_sub(b.used) {
                b.charge("select", per_record.saturating_mul(recs.len()))?;
            }
            for r in recs.iter_mut() {
                b.tick()?;
                let mut out = Map::new();
                for f in &fields {
                    let v = r.get(f).cloned().unwrap_or(J::Null);
                    b.charge("select", ENTRY + f.len() + cost(&v))?;
                    out.insert(f.clone(), v);
                }
                b.give_back(rec_cost(r));
                *r = out;
            }
        }
        if let Some(a) = obj.get("aggregate") {
            (columns, recs) = aggregate(a, &recs, b)?;
        }
        let count = recs.len();
        let mut seen: HashSet<String> = columns.iter().cloned().collect();
        for r in &recs {
            b.tick()?;
            for k in r.keys() {
                if !seen.contains(k) {
                    seen.insert(k.clone());
                    columns.push(k.clone());
                }
            }
        }
        let format = match obj.get("format") {
            None => "records",
            Some(J::String(s)) if s == "records" || s == "csv" => s.as_str(),
            Some(_) => return Err(err("format", "expected `records` or `csv`")),
        };
        let mut out = Map::new();
        if format == "csv" {
            out.insert(
                "csv".into(),
                J::String(to_csv(&columns, &recs, b, self.max_output_bytes)?),
            );
        } else {
            out.insert(
                "records".into(),
                J::Array(recs.into_iter().map(J::Object).collect()),
            );
        }
        out.insert("columns".into(), J::from(columns));
        out.insert("count".into(), J::from(count));
        Ok(J::Object(out))
    }
}

/// Splits CSV text into rows of cells (RFC 4180 quotes, `""` escapes).
fn csv_rows(text: &str, b: &Budget) -> Result<Vec<Vec<String>>, PluginError> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut cell = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    cell.push('"');
                }
                '"' => quoted = false,
                '\n' => {
                    line += 1;
                    cell.push(c)
                }
                _ => cell.push(c),
            }
            continue;
        }
        match c {
            '"' if cell.is_empty() => quoted = true,
            ',' => row.push(std::mem::take(&mut cell)),
            '\r' => {}
            '\n' => {
                line += 1;
                row.push(std::mem::take(&mut cell));
                if !(row.len() == 1 && row[0].is_empty()) {
                    rows.push(std::mem::take(&mut row));
                    if rows.len().is_multiple_of(1024) {
                        b.tick()?;
                    }
                }
                row.clear();
            }
            _ => cell.push(c),
        }
    }
    if quoted {
        return Err(err("csv", format!("unterminated quote (line {line})")));
    }
    row.push(cell);
    if !(row.len() == 1 && row[0].is_empty()) {
        rows.push(row);
    }
    Ok(rows)
}

fn csv_cell(s: &str) -> J {
    let t = s.trim();
    if let Ok(i) = t.parse::<i64>() {
        return J::from(i);
    }
    match t.parse::<f64>() {
        Ok(f) if f.is_finite() && !t.is_empty() => J::from(f),
        _ => J::String(s.to_string()),
    }
}

fn parse_csv(
    text: &str,
    max_records: usize,
    b: &mut Budget,
) -> Result<(Vec<String>, Vec<Rec>), PluginError> {
    let mut rows = csv_rows(text, b)?.into_iter();
    let header: Vec<String> = rows
        .next()
        .ok_or_else(|| err("csv", "empty: expected a header row"))?
        .into_iter()
        .map(|h| h.trim().to_string())
        .collect();
    if rows.len() > max_records {
        return Err(err(
            "records",
            format!(
                "{} records, more than max_records ({max_records})",
                rows.len()
            ),
        ));
    }
    let recs = rows
        .enumerate()
        .map(|(i, row)| {
            b.tick()?;
            if row.len() != header.len() {
                return Err(err(
                    "csv",
                    format!(
                        "row {} has {} cells, the header has {}",
                        i + 2,
                        row.len(),
                        header.len()
                    ),
                ));
            }
            let mut rec = Map::new();
            b.charge("csv", VALUE)?;
            for (h, c) in header.iter().zip(row.iter()) {
                let v = csv_cell(c);
                b.charge("csv", ENTRY + h.len() + cost(&v))?;
                rec.insert(h.clone(), v);
            }
            Ok(rec)
        })
        .collect::<Result<_, _>>()?;
    Ok((header, recs))
}

/// The records as CSV text, every cell checked against `max` (the longest
/// text a result can carry) and the work budget before it is appended: a
/// few records with fields of their own each make rows x columns cells.
fn to_csv(
    columns: &[String],
    recs: &[Rec],
    b: &mut Budget,
    max: usize,
) -> Result<String, PluginError> {
    let mut header: Vec<&String> = columns.iter().collect();
    let mut seen: HashSet<&String> = header.iter().copied().collect();
    for r in recs {
        for k in r.keys() {
            if seen.insert(k) {
                header.push(k);
            }
        }
    }
    let mut out = String::new();
    for (i, h) in header.iter().enumerate() {
        push_cell(&mut out, h, i == 0, max, b)?;
    }
    push_newline(&mut out, max, b)?;
    for r in recs {
        b.tick()?;
        for (i, h) in header.iter().enumerate() {
            let cell: std::borrow::Cow<str> = match r.get(*h) {
                None | Some(J::Null) => "".into(),
                Some(J::String(s)) => s.as_str().into(),
                Some(v) => v.to_string().into(),
            };
            push_cell(&mut out, &cell, i == 0, max, b)?;
        }
        push_newline(&mut out, max, b)?;
    }
    Ok(out)
}

fn csv_too_large(max: usize) -> PluginError {
    PluginError::TooLarge {
        plugin: NAME.into(),
        field: "csv".into(),
        message: format!(
            "the CSV text would be longer than max_output_bytes ({max} bytes, what one result \
             can carry); select fewer fields or records, or use format `records`"
        ),
    }
}

/// Appends one cell (after a comma unless it is the first of its row),
/// quoted when it must be (RFC 4180), if the text stays within `max`.
fn push_cell(
    out: &mut String,
    s: &str,
    first: bool,
    max: usize,
    b: &mut Budget,
) -> Result<(), PluginError> {
    let quoted = s.contains([',', '"', '\n']);
    let len = if quoted {
        s.len() + 2 + s.matches('"').count()
    } else {
        s.len()
    };
    let n = len + usize::from(!first);
    if out.len().saturating_add(n) > max {
        return Err(csv_too_large(max));
    }
    b.charge("csv", n)?;
    if !first {
        out.push(',');
    }
    if quoted {
        out.push('"');
        out.push_str(&s.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(s);
    }
    Ok(())
}

fn push_newline(out: &mut String, max: usize, b: &mut Budget) -> Result<(), PluginError> {
    if out.len() + 1 > max {
        return Err(csv_too_large(max));
    }
    b.charge("csv", 1)?;
    out.push('\n');
    Ok(())
}

struct Cond {
    field: String,
    op: String,
    value: J,
}

fn num(v: &J) -> Option<f64> {
    v.as_f64()
}

impl Cond {
    fn holds(&self, r: &Rec) -> bool {
        let got = r.get(&self.field).unwrap_or(&J::Null);
        let cmp = || -> Option<std::cmp::Ordering> {
            match (num(got), num(&self.value)) {
                (Some(a), Some(b)) => a.partial_cmp(&b),
                _ => match (got.as_str(), self.value.as_str()) {
                    (Some(a), Some(b)) => Some(a.cmp(b)),
                    _ => None,
                },
            }
        };
        use std::cmp::Ordering::*;
        match self.op.as_str() {
            "==" => cmp() == Some(Equal) || got == &self.value,
            "!=" => !(cmp() == Some(Equal) || got == &self.value),
            ">" => cmp() == Some(Greater),
            ">=" => matches!(cmp(), Some(Greater | Equal)),
            "<" => cmp() == Some(Less),
            "<=" => matches!(cmp(), Some(Less | Equal)),
            "contains" => match (got, self.value.as_str()) {
                (J::String(s), Some(n)) => s.contains(n),
                (J::Array(a), _) => a.contains(&self.value),
                _ => false,
            },
            "in" => self.value.as_array().is_some_and(|a| {
                a.iter()
                    .any(|v| v == got || (num(v).is_some() && num(v) == num(got)))
            }),
            "exists" => got.is_null() != self.value.as_bool().unwrap_or(true),
            _ => false,
        }
    }
}

const OPS: [&str; 10] = [
    "==", "!=", ">", ">=", "<", "<=", "contains", "in", "exists", "",
];

fn parse_filter(f: &J) -> Result<Vec<Cond>, PluginError> {
    let list = f
        .as_array()
        .ok_or_else(|| err("filter", "expected a list of {field, op, value}"))?;
    list.iter()
        .enumerate()
        .map(|(i, c)| {
            let at = |k: &str| format!("filter[{i}].{k}");
            let field = c
                .get("field")
                .and_then(J::as_str)
                .ok_or_else(|| err(&at("field"), "expected a field name"))?;
            let op = c
                .get("op")
                .and_then(J::as_str)
                .ok_or_else(|| err(&at("op"), "expected an operator"))?;
            if op.is_empty() || !OPS.contains(&op) {
                return Err(err(
                    &at("op"),
                    format!("`{op}` is not one of ==, !=, >, >=, <, <=, contains, in, exists"),
                ));
            }
            let value = c.get("value").cloned().unwrap_or(J::Null);
            if op == "in" && !value.is_array() {
                return Err(err(&at("value"), "`in` needs a list"));
            }
            if value.is_null() && op != "exists" {
                return Err(err(&at("value"), "missing"));
            }
            Ok(Cond {
                field: field.to_string(),
                op: op.to_string(),
                value,
            })
        })
        .collect()
}

/// `map`: `{"new": {"field": "a" | "value": X, "mul"|"div"|"add"|"sub": n, "round": digits}}`.
fn apply_map(m: &J, recs: &mut [Rec], b: &mut Budget) -> Result<(), PluginError> {
    let specs = m
        .as_object()
        .ok_or_else(|| err("map", "expected an object of new_field: {field|value, ...}"))?;
    for (name, spec) in specs {
        let at = |k: &str| format!("map.{name}.{k}");
        let spec = spec
            .as_object()
            .ok_or_else(|| err(&format!("map.{name}"), "expected an object"))?;
        for k in spec.keys() {
            if !["field", "value", "mul", "div", "add", "sub", "round"].contains(&k.as_str()) {
                return Err(err(
                    &at(k),
                    "unknown key (known: field, value, mul, div, add, sub, round)",
                ));
            }
        }
        let source = match (spec.get("field"), spec.get("value")) {
            (Some(J::String(f)), None) => Ok(f.clone()),
            (None, Some(v)) => Err(v.clone()),
            _ => return Err(err(&at("field"), "give exactly one of `field` or `value`")),
        };
        let mut arith = Vec::new();
        for op in ["mul", "div", "add", "sub"] {
            if let Some(v) = spec.get(op) {
                let n = v
                    .as_f64()
                    .ok_or_else(|| err(&at(op), "expected a number"))?;
                if op == "div" && n == 0.0 {
                    return Err(err(&at(op), "division by zero"));
                }
                arith.push((op, n));
            }
        }
        let round = match spec.get("round") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .filter(|d| *d <= 12)
                    .ok_or_else(|| err(&at("round"), "expected 0 to 12 digits"))?
                    as i32,
            ),
        };
        let field = format!("map.{name}");
        // A constant costs the same in every record: checked once for all.
        if let Err(c) = &source {
            let each = ENTRY + name.len() + cost(c);
            if each.saturating_mul(recs.len()) > b.max.saturating_sub(b.used) {
                b.charge(&field, each.saturating_mul(recs.len()))?;
            }
        }
        for (i, r) in recs.iter_mut().enumerate() {
            b.tick()?;
            let v = match &source {
                Ok(f) => r.get(f).cloned().unwrap_or(J::Null),
                Err(c) => c.clone(),
            };
            let v = if arith.is_empty() && round.is_none() {
                v
            } else if v.is_null() {
                J::Null
            } else {
                let mut x = num(&v).ok_or_else(|| {
                    err(&at("field"), format!("record {i}: `{v}` is not a number"))
                })?;
                for (op, n) in &arith {
                    match *op {
                        "mul" => x *= n,
                        "div" => x /= n,
                        "add" => x += n,
                        _ => x -= n,
                    }
                }
                if let Some(d) = round {
                    let p = 10f64.powi(d);
                    x = (x * p).round() / p;
                }
                number(x)
            };
            b.charge(&field, ENTRY + name.len() + cost(&v))?;
            if let Some(old) = r.insert(name.clone(), v) {
                b.give_back(ENTRY + name.len() + cost(&old));
            }
        }
    }
    Ok(())
}

/// An f64 as JSON: integral values as integers, so CSV and sums stay tidy.
fn number(x: f64) -> J {
    if x.fract() == 0.0 && x.abs() < 9e15 {
        J::from(x as i64)
    } else {
        serde_json::Number::from_f64(x).map_or(J::Null, J::Number)
    }
}

fn aggregate(a: &J, recs: &[Rec], b: &mut Budget) -> Result<(Vec<String>, Vec<Rec>), PluginError> {
    let spec = a
        .as_object()
        .ok_or_else(|| err("aggregate", "expected an object"))?;
    for k in spec.keys() {
        if !["group_by", "count", "sum", "mean", "min", "max"].contains(&k.as_str()) {
            return Err(err(
                &format!("aggregate.{k}"),
                "unknown key (known: group_by, count, sum, mean, min, max)",
            ));
        }
    }
    let group_by: Vec<String> = match spec.get("group_by") {
        None | Some(J::Null) => Vec::new(),
        Some(J::String(s)) => vec![s.clone()],
        Some(J::Array(a)) => a
            .iter()
            .map(|f| f.as_str().map(String::from))
            .collect::<Option<_>>()
            .ok_or_else(|| err("aggregate.group_by", "expected a field name or a list"))?,
        Some(_) => return Err(err("aggregate.group_by", "expected a field name or a list")),
    };
    let count = match spec.get("count") {
        None => false,
        Some(J::Bool(b)) => *b,
        Some(_) => return Err(err("aggregate.count", "expected true or false")),
    };
    let fields = |k: &str| -> Result<Vec<String>, PluginError> {
        match spec.get(k) {
            None => Ok(Vec::new()),
            Some(J::Array(a)) => a
                .iter()
                .map(|f| f.as_str().map(String::from))
                .collect::<Option<_>>()
                .ok_or_else(|| err(&format!("aggregate.{k}"), "expected a list of field names")),
            Some(_) => Err(err(
                &format!("aggregate.{k}"),
                "expected a list of field names",
            )),
        }
    };
    let reducers: Vec<(&str, Vec<String>)> = ["sum", "mean", "min", "max"]
        .into_iter()
        .map(|k| fields(k).map(|f| (k, f)))
        .collect::<Result<_, _>>()?;
    // Groups in order of first appearance.
    let mut groups: Vec<(Vec<J>, Vec<&Rec>)> = Vec::new();
    // Index by the key's JSON text: linear in the records, whatever the
    // number of groups.
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for r in recs {
        b.tick()?;
        let key: Vec<J> = group_by
            .iter()
            .map(|f| r.get(f).cloned().unwrap_or(J::Null))
            .collect();
        let text = J::Array(key.clone()).to_string();
        b.charge("aggregate", 8)?;
        match index.get(&text) {
            Some(&i) => groups[i].1.push(r),
            None => {
                b.charge(
                    "aggregate",
                    2 * (ENTRY + text.len()) + key.iter().map(cost).sum::<usize>(),
                )?;
                index.insert(text, groups.len());
                groups.push((key, vec![r]));
            }
        }
    }
    // Groups x fields, before building any of it.
    let per_group = VALUE
        + group_by.iter().map(|f| ENTRY + f.len()).sum::<usize>()
        + if count { ENTRY + 5 + VALUE } else { 0 }
        + reducers
            .iter()
            .map(|(kind, fs)| {
                fs.iter()
                    .map(|f| ENTRY + kind.len() + 1 + f.len() + VALUE)
                    .sum::<usize>()
            })
            .sum::<usize>();
    b.charge("aggregate", per_group.saturating_mul(groups.len()))?;
    let mut columns = group_by.clone();
    if count {
        columns.push("count".into());
    }
    for (kind, fs) in &reducers {
        columns.extend(fs.iter().map(|f| format!("{kind}_{f}")));
    }
    let mut out = Vec::new();
    for (key, members) in groups {
        let mut o = Map::new();
        for (f, v) in group_by.iter().zip(key) {
            o.insert(f.clone(), v);
        }
        if count {
            o.insert("count".into(), J::from(members.len()));
        }
        for (kind, fs) in &reducers {
            for f in fs {
                b.tick()?;
                let mut xs = Vec::new();
                for (i, r) in members.iter().enumerate() {
                    match r.get(f) {
                        None | Some(J::Null) => {}
                        Some(v) => xs.push(num(v).ok_or_else(|| {
                            err(
                                &format!("aggregate.{kind}"),
                                format!(
                                    "field `{f}` of record {i} in its group is `{v}`, not a number"
                                ),
                            )
                        })?),
                    }
                }
                let v = match *kind {
                    "sum" => number(xs.iter().sum()),
                    "mean" if xs.is_empty() => J::Null,
                    "mean" => number(xs.iter().sum::<f64>() / xs.len() as f64),
                    "min" => xs.iter().copied().reduce(f64::min).map_or(J::Null, number),
                    _ => xs.iter().copied().reduce(f64::max).map_or(J::Null, number),
                };
                o.insert(format!("{kind}_{f}"), v);
            }
        }
        out.push(o);
    }
    Ok((columns, out))
}

#[async_trait]
impl Plugin for Transform {
    fn name(&self) -> &'static str {
        NAME
    }

    fn description(&self) -> String {
        "Shapes tabular data (select, filter, aggregate) between pipeline steps.".into()
    }

    fn input_schema(&self) -> Schema {
        Schema::object()
            .field(
                "records",
                Schema::array(Schema::object().open()).len(0, self.max_records),
            )
            .field("csv", Schema::string().desc("text with a header row"))
            .field(
                "filter",
                Schema::array(
                    Schema::object()
                        .req("field", Schema::string())
                        .req(
                            "op",
                            Schema::enumeration(&[
                                "==", "!=", ">", ">=", "<", "<=", "contains", "in", "exists",
                            ]),
                        )
                        .field("value", Schema::any()),
                ),
            )
            .field(
                "map",
                Schema::object()
                    .open()
                    .desc("new field -> {field|value, mul, div, add, sub, round}"),
            )
            .field("select", Schema::array(Schema::string()))
            .field("aggregate", Schema::object().open())
            .field("format", Schema::enumeration(&["records", "csv"]))
    }

    fn concurrency(&self) -> usize {
        super::util::cpus()
    }

    async fn execute(&self, task: TaskContext) -> Result<Value, PluginError> {
        let input = J::from(task.input.clone());
        let me = Transform {
            max_records: self.max_records,
            max_work_bytes: self.max_work_bytes,
            max_output_bytes: self.max_output_bytes,
        };
        let stop = Stop::of(&task);
        // Up to max_records rows: keep them off the async threads.
        let out = super::util::blocking(NAME, &task, move || me.run_until(&input, &stop)).await?;
        Ok(Value::from(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t() -> Transform {
        Transform {
            max_records: 100,
            max_work_bytes: 1 << 20,
            max_output_bytes: 4096,
        }
    }

    #[test]
    fn programs_that_would_build_too_much_fail_before_building() {
        let empties: Vec<J> = (0..100).map(|_| json!({})).collect();
        let recs: Vec<J> = (0..100).map(|i| json!({ "g": i })).collect();
        let many: Vec<String> = (0..2000).map(|i| format!("f{i}")).collect();
        for (input, field) in [
            (
                json!({"records": empties, "map": {"x": {"value": "y".repeat(20_000)}}}),
                "`map.x`",
            ),
            (
                json!({"records": recs, "aggregate": {"group_by": "g", "sum": many}}),
                "`aggregate`",
            ),
            (json!({"records": recs, "select": many}), "`select`"),
        ] {
            let e = t().run(&input).unwrap_err().to_string();
            assert!(e.contains(field) && e.contains("max_work_bytes"), "{e}");
        }
        // The same shapes at a sane size still run.
        let r = t()
            .run(&json!({"records": [{"g": 1}, {"g": 2}], "map": {"x": {"value": "y"}}}))
            .unwrap();
        assert_eq!(r["count"], 2);
    }

    #[test]
    fn csv_output_stops_at_max_output_bytes() {
        // 300 records with a field each of their own: 300 x 300 cells,
        // about 90 KB of CSV from a few KB of records.
        let t = Transform {
            max_records: 1000,
            max_work_bytes: 1 << 20,
            max_output_bytes: 4096,
        };
        let recs: Vec<J> = (0..300).map(|i| json!({ format!("k{i}"): 1 })).collect();
        let e = t
            .run(&json!({"records": recs, "format": "csv"}))
            .unwrap_err();
        assert!(
            matches!(e, PluginError::TooLarge { ref field, .. } if field == "csv"),
            "{e}"
        );
        assert!(e.to_string().contains("max_output_bytes (4096"), "{e}");
        // Quotes count as written: 2100 `"` become 4202 bytes.
        let e = t
            .run(&json!({"records": [{"q": "\"".repeat(2100)}], "format": "csv"}))
            .unwrap_err();
        assert!(matches!(e, PluginError::TooLarge { .. }), "{e}");
        let r = t
            .run(&json!({"records": [{"q": "\"".repeat(2000)}, {"q": 1}], "format": "records"}))
            .unwrap();
        assert_eq!(r["count"], 2);
    }

    #[test]
    fn a_stopped_run_gives_up() {
        let cancel = tokio_util::sync::CancellationToken::new();
        cancel.cancel();
        let stop = Stop::of(&TaskContext {
            id: "t".into(),
            input: Value::Null,
            deadline: std::time::Instant::now() + std::time::Duration::from_secs(60),
            cancel,
            attempt: 1,
            output: Default::default(),
        });
        let e = t()
            .run_until(
                &json!({"records": [{"a": 1}], "filter": [{"field": "a", "op": ">", "value": 0}]}),
                &stop,
            )
            .unwrap_err();
        assert_eq!(e, PluginError::Cancelled(NAME.into()));
    }

    #[test]
    fn filter_map_select_aggregate_records() {
        let recs = json!([
            {"line": "A", "qty": 2, "t": 31.5},
            {"line": "A", "qty": 3, "t": 35},
            {"line": "B", "qty": 5, "t": 29},
            {"line": "B", "qty": 1, "t": 40}
        ]);
        let r = t()
            .run(
                &json!({"records": recs, "filter": [{"field": "t", "op": ">", "value": 30}],
                "map": {"double": {"field": "qty", "mul": 2}}, "select": ["line", "double"]}),
            )
            .unwrap();
        assert_eq!(
            r["records"],
            json!([{"line": "A", "double": 4}, {"line": "A", "double": 6}, {"line": "B", "double": 2}])
        );
        assert_eq!(r["count"], 3);
        let r = t()
            .run(
                &json!({"records": recs, "aggregate": {"group_by": "line", "count": true,
                "sum": ["qty"], "mean": ["t"], "min": ["t"], "max": ["qty"]}}),
            )
            .unwrap();
        assert_eq!(
            r["records"],
            json!([
                {"line": "A", "count": 2, "sum_qty": 5, "mean_t": 33.25, "min_t": 31.5, "max_qty": 3},
                {"line": "B", "count": 2, "sum_qty": 6, "mean_t": 34.5, "min_t": 29, "max_qty": 5}
            ])
        );
    }

    #[test]
    fn csv_in_and_out() {
        let csv = "name,qty,note\nR1,4,\"10k, 1%\"\nC2,10,\"say \"\"hi\"\"\"\n";
        let r = t()
            .run(&json!({"csv": csv, "filter": [{"field": "qty", "op": ">=", "value": 5}]}))
            .unwrap();
        assert_eq!(
            r["records"],
            json!([{"name": "C2", "qty": 10, "note": "say \"hi\""}])
        );
        let r = t().run(&json!({"csv": csv, "format": "csv"})).unwrap();
        assert_eq!(r["csv"], csv);
        let r = t()
            .run(
                &json!({"csv": csv, "filter": [{"field": "name", "op": "in", "value": ["R1"]},
                {"field": "note", "op": "contains", "value": "1%"}]}),
            )
            .unwrap();
        assert_eq!(r["count"], 1);
    }

    #[test]
    fn bad_programs_name_the_field() {
        for (input, field) in [
            (json!([1]), "`input`"),
            (json!({}), "`records`"),
            (json!({"records": [1]}), "`records[0]`"),
            (json!({"csv": "a,b\n1"}), "`csv`"),
            (json!({"csv": "a\n\"x"}), "unterminated"),
            (
                json!({"records": [], "filter": [{"field": "a", "op": "~", "value": 1}]}),
                "`filter[0].op`",
            ),
            (
                json!({"records": [], "filter": [{"op": ">", "value": 1}]}),
                "`filter[0].field`",
            ),
            (
                json!({"records": [], "filter": [{"field": "a", "op": ">"}]}),
                "`filter[0].value`",
            ),
            (
                json!({"records": [{"a": "x"}], "map": {"b": {"field": "a", "mul": 2}}}),
                "`map.b.field`",
            ),
            (
                json!({"records": [], "map": {"b": {"field": "a", "div": 0}}}),
                "`map.b.div`",
            ),
            (
                json!({"records": [], "map": {"b": {"feld": "a"}}}),
                "`map.b.feld`",
            ),
            (json!({"records": [], "select": "a"}), "`select`"),
            (
                json!({"records": [{"q": "x"}], "aggregate": {"sum": ["q"]}}),
                "`aggregate.sum`",
            ),
            (
                json!({"records": [], "aggregate": {"avg": ["q"]}}),
                "`aggregate.avg`",
            ),
            (json!({"records": [], "frob": 1}), "`frob`"),
            (json!({"records": [], "format": "xml"}), "`format`"),
            (
                json!({"records": (0..101).map(|_| json!({})).collect::<Vec<_>>()}),
                "max_records",
            ),
        ] {
            let e = t().run(&input).unwrap_err().to_string();
            assert!(
                e.contains("`transform`") && e.contains(field),
                "{input}: {e}"
            );
        }
    }
}
