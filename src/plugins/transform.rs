//! `transform`: shapes tabular data between pipeline steps without code.
//!
//! Input is `records` (a list of objects) or `csv` (text with a header row;
//! cells that parse as numbers become numbers). Steps run in a fixed order:
//! `filter` (all conditions must hold), `map` (computed fields), `select`
//! (keep these fields, in this order), `aggregate` (group and reduce). The
//! language is documented in docs/plugins.md.

use super::schema::Schema;
use super::util::cfg_u64;
use super::{check_keys, Plugin, PluginError, TaskContext};
use crate::protocol::Value;
use async_trait::async_trait;
use serde_json::{Map, Value as J};

const NAME: &str = "transform";

/// The transform plugin.
#[derive(Debug)]
pub struct Transform {
    max_records: usize,
}

type Rec = Map<String, J>;

fn err(field: &str, message: impl Into<String>) -> PluginError {
    super::util::invalid(NAME, field, message)
}

impl Transform {
    /// Config keys: `max_records` (default 100000).
    pub fn from_config(config: &toml::Table) -> Result<Transform, PluginError> {
        check_keys(NAME, config, &["max_records"])?;
        Ok(Transform {
            max_records: cfg_u64(NAME, config, "max_records", 100_000, 1, 10_000_000)? as usize,
        })
    }

    /// Runs the whole pipeline on a JSON input.
    pub fn run(&self, input: &J) -> Result<J, PluginError> {
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
            (Some(J::Array(a)), None) => a
                .iter()
                .enumerate()
                .map(|(i, r)| match r {
                    J::Object(o) => Ok(o.clone()),
                    _ => Err(err(&format!("records[{i}]"), "expected an object")),
                })
                .collect::<Result<Vec<_>, _>>()?,
            (None, Some(J::String(s))) => {
                let (header, recs) = parse_csv(s)?;
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
            recs.retain(|r| conds.iter().all(|c| c.holds(r)));
        }
        if let Some(m) = obj.get("map") {
            apply_map(m, &mut recs)?;
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
            for r in recs.iter_mut() {
                let mut out = Map::new();
                for f in &fields {
                    out.insert(f.clone(), r.get(f).cloned().unwrap_or(J::Null));
                }
                *r = out;
            }
        }
        if let Some(a) = obj.get("aggregate") {
            (columns, recs) = aggregate(a, &recs)?;
        }
        let count = recs.len();
        for r in &recs {
            for k in r.keys() {
                if !columns.contains(k) {
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
            out.insert("csv".into(), J::String(to_csv(&columns, &recs)));
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
fn csv_rows(text: &str) -> Result<Vec<Vec<String>>, PluginError> {
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

fn parse_csv(text: &str) -> Result<(Vec<String>, Vec<Rec>), PluginError> {
    let mut rows = csv_rows(text)?.into_iter();
    let header: Vec<String> = rows
        .next()
        .ok_or_else(|| err("csv", "empty: expected a header row"))?
        .into_iter()
        .map(|h| h.trim().to_string())
        .collect();
    let recs = rows
        .enumerate()
        .map(|(i, row)| {
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
            Ok(header
                .iter()
                .cloned()
                .zip(row.iter().map(|c| csv_cell(c)))
                .collect())
        })
        .collect::<Result<_, _>>()?;
    Ok((header, recs))
}

fn to_csv(columns: &[String], recs: &[Rec]) -> String {
    let mut header: Vec<&String> = columns.iter().collect();
    for r in recs {
        for k in r.keys() {
            if !header.contains(&k) {
                header.push(k);
            }
        }
    }
    let quote = |s: &str| {
        if s.contains([',', '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    let mut out = header
        .iter()
        .map(|h| quote(h))
        .collect::<Vec<_>>()
        .join(",");
    out.push('\n');
    for r in recs {
        let cells: Vec<String> = header
            .iter()
            .map(|h| match r.get(*h) {
                None | Some(J::Null) => String::new(),
                Some(J::String(s)) => quote(s),
                Some(v) => quote(&v.to_string()),
            })
            .collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
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
fn apply_map(m: &J, recs: &mut [Rec]) -> Result<(), PluginError> {
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
        for (i, r) in recs.iter_mut().enumerate() {
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
            r.insert(name.clone(), v);
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

fn aggregate(a: &J, recs: &[Rec]) -> Result<(Vec<String>, Vec<Rec>), PluginError> {
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
        let key: Vec<J> = group_by
            .iter()
            .map(|f| r.get(f).cloned().unwrap_or(J::Null))
            .collect();
        let text = J::Array(key.clone()).to_string();
        match index.get(&text) {
            Some(&i) => groups[i].1.push(r),
            None => {
                index.insert(text, groups.len());
                groups.push((key, vec![r]));
            }
        }
    }
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
        };
        // Up to max_records rows: keep them off the async threads.
        let out = super::util::blocking(NAME, &task, move || me.run(&input)).await?;
        Ok(Value::from(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t() -> Transform {
        Transform { max_records: 100 }
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
