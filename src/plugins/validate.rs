//! `validate`: rule checks over records (a bill of materials a model read,
//! rows from a sensor log): each rule names a field and a check, optionally
//! only for records matching a condition; every broken rule is an issue
//! with the row, the field, a kind and, where one is known, a proposed
//! correction. The records with the corrections applied come back too.
//!
//! Rules are data in the task's input, so a workflow carries its own
//! (examples/bom/bom.toml) and nothing on the device needs changing.

use super::schema::Schema;
use super::util::{as_f64, blocking, invalid, Stop};
use super::{check_keys, Plugin, PluginError, TaskContext};
use crate::protocol::Value;
use async_trait::async_trait;

const NAME: &str = "validate";
/// Most records and rules one task checks.
const MAX_RECORDS: usize = 10_000;
const MAX_RULES: usize = 256;
/// Most values a rule's lists (`values`, `aliases`, `when`) hold.
const MAX_LIST: usize = 1_000;
/// Words of a field a `contains_any` condition looks at.
const MAX_WORDS: usize = 256;
/// Most issues one task reports (a result must fit in one message).
const MAX_ISSUES: usize = 2_000;

/// The validate plugin.
#[derive(Debug, Default)]
pub struct Validate;

impl Validate {
    /// No config keys of its own.
    pub fn from_config(config: &toml::Table) -> Result<Validate, PluginError> {
        check_keys(NAME, config, &[])?;
        Ok(Validate)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Check {
    Required,
    Positive,
    Integer,
    OneOf,
}

/// When a rule applies: the record's `field` is one of `one_of` and
/// contains one of `contains_any` (words, case-insensitive), each when given.
#[derive(Debug)]
struct When {
    field: String,
    one_of: Vec<String>,
    contains_any: Vec<String>,
}

#[derive(Debug)]
struct Rule {
    field: String,
    check: Check,
    values: Vec<String>,
    /// Spellings that mean one of `values`: (alias, canonical).
    aliases: Vec<(String, String)>,
    when: Option<When>,
    kind: String,
    /// The kind when the value is one of `aliases` (default `kind`).
    alias_kind: Option<String>,
    suggest: Option<Value>,
}

fn strings(v: Option<&Value>, field: &str) -> Result<Vec<String>, PluginError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::List(l)) if l.len() <= MAX_LIST => l
            .iter()
            .map(|x| match x {
                Value::Str(s) => Ok(s.clone()),
                _ => Err(invalid(NAME, field, "expected strings")),
            })
            .collect(),
        Some(_) => Err(invalid(
            NAME,
            field,
            format!("expected a list of at most {MAX_LIST} strings"),
        )),
    }
}

fn parse_rule(v: &Value, i: usize) -> Result<Rule, PluginError> {
    let at = |k: &str| format!("rules[{i}].{k}");
    let Value::Map(m) = v else {
        return Err(invalid(NAME, &format!("rules[{i}]"), "expected an object"));
    };
    for (k, _) in m {
        if ![
            "field",
            "check",
            "values",
            "aliases",
            "when",
            "kind",
            "alias_kind",
            "suggest",
        ]
        .contains(&k.as_str())
        {
            return Err(invalid(NAME, &at(k), "unknown key"));
        }
    }
    let field = match v.get("field") {
        Some(Value::Str(s)) if !s.is_empty() => s.clone(),
        _ => return Err(invalid(NAME, &at("field"), "expected a field name")),
    };
    let check = match v.get("check") {
        Some(Value::Str(s)) => match s.as_str() {
            "required" => Check::Required,
            "positive" => Check::Positive,
            "integer" => Check::Integer,
            "one_of" => Check::OneOf,
            other => {
                return Err(invalid(
                    NAME,
                    &at("check"),
                    format!("`{other}` is not one of required, positive, integer, one_of"),
                ))
            }
        },
        _ => return Err(invalid(NAME, &at("check"), "expected a string")),
    };
    let values = strings(v.get("values"), &at("values"))?;
    if check == Check::OneOf && values.is_empty() {
        return Err(invalid(
            NAME,
            &at("values"),
            "one_of needs the allowed values",
        ));
    }
    let aliases = match v.get("aliases") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Map(a)) if a.len() <= MAX_LIST => a
            .iter()
            .map(|(k, x)| match x {
                Value::Str(s) if values.contains(s) => Ok((k.clone(), s.clone())),
                _ => Err(invalid(
                    NAME,
                    &format!("{}.{k}", at("aliases")),
                    "an alias must name one of `values`",
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(invalid(NAME, &at("aliases"), "expected an object")),
    };
    let when = match v.get("when") {
        None | Some(Value::Null) => None,
        Some(w @ Value::Map(_)) => Some(When {
            field: match w.get("field") {
                Some(Value::Str(s)) => s.clone(),
                _ => return Err(invalid(NAME, &at("when.field"), "expected a field name")),
            },
            one_of: strings(w.get("one_of"), &at("when.one_of"))?,
            contains_any: strings(w.get("contains_any"), &at("when.contains_any"))?
                .into_iter()
                .map(|s| s.to_lowercase())
                .collect(),
        }),
        Some(_) => return Err(invalid(NAME, &at("when"), "expected an object")),
    };
    let kind = match v.get("kind") {
        None => match check {
            Check::Required => "missing",
            Check::Positive => "not_positive",
            Check::Integer => "not_integer",
            Check::OneOf => "not_allowed",
        }
        .to_string(),
        Some(Value::Str(s)) => s.clone(),
        Some(_) => return Err(invalid(NAME, &at("kind"), "expected a string")),
    };
    let alias_kind = match v.get("alias_kind") {
        None => None,
        Some(Value::Str(s)) => Some(s.clone()),
        Some(_) => return Err(invalid(NAME, &at("alias_kind"), "expected a string")),
    };
    Ok(Rule {
        field,
        check,
        values,
        aliases,
        when,
        kind,
        alias_kind,
        suggest: v.get("suggest").cloned(),
    })
}

fn text_of(v: Option<&Value>) -> Option<String> {
    match v {
        Some(Value::Str(s)) => Some(s.clone()),
        Some(Value::Int(i)) => Some(i.to_string()),
        Some(Value::Float(f)) => Some(f.to_string()),
        Some(Value::Bool(b)) => Some(b.to_string()),
        _ => None,
    }
}

fn applies(w: &Option<When>, rec: &Value) -> bool {
    let Some(w) = w else { return true };
    let Some(v) = text_of(rec.get(&w.field)) else {
        return false;
    };
    let lower = v.to_lowercase();
    // A word matches itself and its plurals (`bolts`, `bushes`).
    let names = |word: &str, x: &str| {
        word == x || word.strip_suffix('s') == Some(x) || word.strip_suffix("es") == Some(x)
    };
    // Words as written (`o-ring`) and their hyphenated parts (`lock-nut`: `nut`).
    let words = lower
        .split(|c: char| !c.is_alphanumeric() && c != '-')
        .flat_map(|w| std::iter::once(w).chain(w.split('-')));
    (w.one_of.is_empty() || w.one_of.contains(&v.trim().to_string()))
        && (w.contains_any.is_empty()
            || words
                .take(MAX_WORDS)
                .any(|word| w.contains_any.iter().any(|x| names(word, x))))
}

/// The values a message lists before it says how many more there are.
fn listed(values: &[String]) -> String {
    let mut s = values
        .iter()
        .take(8)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if values.len() > 8 {
        s.push_str(&format!(", ... ({} in all)", values.len()));
    }
    s
}

fn is_empty(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::Str(s)) => s.trim().is_empty(),
        _ => false,
    }
}

/// The issue `rule` finds in `rec`, if any: (kind, message, suggestion).
fn check<'r>(rule: &'r Rule, rec: &Value) -> Option<(&'r str, String, Value)> {
    let kind = rule.kind.as_str();
    let found = check_value(rule, rec)?;
    Some(match found {
        (true, m, s) => (rule.alias_kind.as_deref().unwrap_or(kind), m, s),
        (false, m, s) => (kind, m, s),
    })
}

/// (whether the value was an alias, message, suggestion).
fn check_value(rule: &Rule, rec: &Value) -> Option<(bool, String, Value)> {
    let v = rec.get(&rule.field);
    let suggest = || rule.suggest.clone().unwrap_or(Value::Null);
    match rule.check {
        Check::Required => is_empty(v).then(|| (false, "is missing".to_string(), suggest())),
        // A missing value is the `required` rule's to report.
        _ if is_empty(v) => None,
        Check::Positive => match v.and_then(as_f64) {
            Some(x) if x > 0.0 => None,
            Some(x) => Some((false, format!("{x} is not positive"), suggest())),
            None => Some((false, "is not a number".into(), suggest())),
        },
        Check::Integer => match v.and_then(as_f64) {
            Some(x) if x.fract() == 0.0 => None,
            Some(x) => Some((false, format!("{x} is not a whole number"), suggest())),
            None => Some((false, "is not a number".into(), suggest())),
        },
        Check::OneOf => {
            let Some(raw) = text_of(v) else {
                return Some((false, "is not text".into(), suggest()));
            };
            let s = raw.trim().to_string();
            if rule.values.contains(&s) {
                // Written with blanks around it: the value without them.
                return (s != raw)
                    .then(|| (true, format!("`{raw}` has blanks around it"), Value::Str(s)));
            }
            let alias = rule
                .aliases
                .iter()
                .find(|(a, _)| *a == s)
                .or_else(|| {
                    rule.aliases
                        .iter()
                        .find(|(a, _)| a.eq_ignore_ascii_case(&s))
                })
                .map(|(_, c)| c.clone())
                .or_else(|| {
                    rule.values
                        .iter()
                        .find(|c| c.eq_ignore_ascii_case(&s))
                        .cloned()
                });
            match alias {
                // An alias proposes what it stands for; `suggest` is for the rest.
                Some(c) => Some((true, format!("`{s}` is written `{c}`"), Value::Str(c))),
                None => Some((
                    false,
                    format!(
                        "`{}` is not one of {}",
                        crate::plugins::util::log_safe(&s, 80),
                        listed(&rule.values)
                    ),
                    suggest(),
                )),
            }
        }
    }
}

#[async_trait]
impl Plugin for Validate {
    fn name(&self) -> &'static str {
        NAME
    }

    fn description(&self) -> String {
        "Checks records against rules (required, positive, integer, one_of with aliases; each optionally only when another field matches) and lists the issues with proposed corrections.".into()
    }

    fn input_schema(&self) -> Schema {
        let rule = Schema::object()
            .req("field", Schema::string())
            .req(
                "check",
                Schema::enumeration(&["required", "positive", "integer", "one_of"]),
            )
            .field("values", Schema::array(Schema::string()))
            .field("aliases", Schema::object().open())
            .field(
                "when",
                Schema::object()
                    .req("field", Schema::string())
                    .field("one_of", Schema::array(Schema::string()))
                    .field("contains_any", Schema::array(Schema::string())),
            )
            .field(
                "kind",
                Schema::string().desc("the issue's name (default from the check)"),
            )
            .field(
                "alias_kind",
                Schema::string().desc("the issue's name when the value is an alias"),
            )
            .field("suggest", Schema::any().desc("the correction to propose"));
        Schema::object()
            .req(
                "records",
                Schema::array(Schema::object().open()).len(0, MAX_RECORDS),
            )
            .req("rules", Schema::array(rule).len(1, MAX_RULES))
    }

    fn concurrency(&self) -> usize {
        super::util::cpus()
    }

    async fn execute(&self, task: TaskContext) -> Result<Value, PluginError> {
        let records = match task.input.get("records") {
            Some(Value::List(l)) if l.len() <= MAX_RECORDS => l.clone(),
            Some(Value::List(l)) => {
                return Err(invalid(
                    NAME,
                    "records",
                    format!("{} records, more than {MAX_RECORDS}", l.len()),
                ))
            }
            _ => return Err(invalid(NAME, "records", "expected a list of objects")),
        };
        let rules = match task.input.get("rules") {
            Some(Value::List(l)) if !l.is_empty() && l.len() <= MAX_RULES => l
                .iter()
                .enumerate()
                .map(|(i, r)| parse_rule(r, i))
                .collect::<Result<Vec<_>, _>>()?,
            _ => {
                return Err(invalid(
                    NAME,
                    "rules",
                    format!("expected a list of 1 to {MAX_RULES} rules"),
                ))
            }
        };
        let stop = Stop::of(&task);
        // CPU-bound over up to records x rules: off the agent's event loop.
        let (issues, corrected, truncated) = blocking(NAME, &task, move || {
            let mut issues = Vec::new();
            let mut corrected = Vec::with_capacity(records.len());
            let mut truncated = false;
            for (row, rec) in records.into_iter().enumerate() {
                if !matches!(rec, Value::Map(_)) {
                    return Err(invalid(
                        NAME,
                        &format!("records[{row}]"),
                        "expected an object",
                    ));
                }
                // Each rule sees the record as the rules before it corrected
                // it: a unit read as an alias is checked as what it stands for.
                let mut fixed = rec;
                for rule in &rules {
                    stop.check(NAME)?;
                    if !applies(&rule.when, &fixed) {
                        continue;
                    }
                    let Some((kind, message, suggestion)) = check(rule, &fixed) else {
                        continue;
                    };
                    let value = fixed.get(&rule.field).cloned().unwrap_or(Value::Null);
                    if let (Value::Map(m), false) = (&mut fixed, suggestion == Value::Null) {
                        match m.iter_mut().find(|(k, _)| *k == rule.field) {
                            Some((_, v)) => *v = suggestion.clone(),
                            None => m.push((rule.field.clone(), suggestion.clone())),
                        }
                    }
                    if issues.len() == MAX_ISSUES {
                        truncated = true;
                        continue;
                    }
                    issues.push(Value::Map(vec![
                        ("row".into(), Value::Int(row as i64 + 1)),
                        ("field".into(), Value::Str(rule.field.clone())),
                        ("kind".into(), Value::Str(kind.to_string())),
                        ("value".into(), value),
                        (
                            "message".into(),
                            Value::Str(format!("row {}: `{}` {message}", row + 1, rule.field)),
                        ),
                        ("suggestion".into(), suggestion),
                    ]));
                }
                corrected.push(fixed);
            }
            Ok((issues, corrected, truncated))
        })
        .await?;
        Ok(Value::Map(vec![
            ("ok".into(), Value::Bool(issues.is_empty())),
            ("checked".into(), Value::Int(corrected.len() as i64)),
            // More issues than one result lists: the count stops at the cap.
            ("truncated".into(), Value::Bool(truncated)),
            ("issues".into(), Value::List(issues)),
            ("corrected".into(), Value::List(corrected)),
        ]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    async fn run(input: serde_json::Value) -> Result<serde_json::Value, PluginError> {
        let task = TaskContext::for_test(Value::from(input));
        Validate.execute(task).await.map(serde_json::Value::from)
    }

    fn bom_rules() -> serde_json::Value {
        json!([
            {"field": "material", "check": "required"},
            {"field": "quantity", "check": "positive"},
            {"field": "unit", "check": "one_of", "values": ["pcs", "m", "kg", "set"],
             "aliases": {"pc": "pcs", "Stk": "pcs"}, "kind": "unit_mismatch", "alias_kind": "unit_alias"},
            {"field": "quantity", "check": "integer", "kind": "unit_mismatch",
             "when": {"field": "unit", "one_of": ["pcs", "set"]}},
            {"field": "unit", "check": "one_of", "values": ["pcs", "set"], "kind": "unit_mismatch",
             "suggest": "pcs", "when": {"field": "description", "contains_any": ["bolt", "nut", "bearing"]}},
        ])
    }

    #[tokio::test]
    async fn issues_name_row_field_kind_and_a_correction() {
        let out = run(json!({"rules": bom_rules(), "records": [
            {"description": "Hex bolt", "quantity": 4, "unit": "pcs", "material": "Steel"},
            {"description": "Hex nut", "quantity": 0, "unit": "PC", "material": ""},
            {"description": "Hose", "quantity": 2.5, "unit": "m", "material": "NBR"},
            {"description": "Hex bolt M8", "quantity": 1.5, "unit": "kg", "material": "Steel"},
            {"description": "Ball bearings", "quantity": 2, "unit": "Stk", "material": "Steel"},
            {"description": "Spring", "quantity": 2, "unit": "box", "material": "Steel"},
            {"description": "Lock-nut", "quantity": 2, "unit": ["kg"], "material": "Steel"},
            {"description": "Plate", "quantity": 1, "unit": " kg ", "material": "Steel"},
        ]}))
        .await
        .unwrap();
        let got: Vec<(i64, &str, &str)> = out["issues"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["row"].as_i64().unwrap(),
                    i["field"].as_str().unwrap(),
                    i["kind"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (2, "material", "missing"),
                (2, "quantity", "not_positive"),
                (2, "unit", "unit_alias"),
                (4, "unit", "unit_mismatch"),
                // corrected to `pcs` first, so not also a mismatch
                (5, "unit", "unit_alias"),
                (6, "unit", "unit_mismatch"),
                // a list is not text (for both unit rules; the second,
                // as a hyphenated word still names a nut, proposes `pcs`)
                (7, "unit", "unit_mismatch"),
                (7, "unit", "unit_mismatch"),
                (8, "unit", "unit_alias"),
            ],
            "{out}"
        );
        assert_eq!(out["issues"][2]["suggestion"], "pcs");
        assert_eq!(out["corrected"][1]["unit"], "pcs");
        assert_eq!(out["corrected"][3]["unit"], "pcs");
        assert_eq!(out["ok"], false);
        assert_eq!(out["checked"], 8);
        assert_eq!(out["corrected"][7]["unit"], "kg");
        assert_eq!(out["truncated"], false);
        // Every key the rules use passes the declared schema the agent checks first.
        Validate
            .input_schema()
            .validate(&Value::from(json!({"rules": bom_rules(), "records": []})))
            .unwrap();
        assert_eq!(out["issues"][5]["suggestion"], serde_json::Value::Null);
    }

    #[tokio::test]
    async fn bad_rules_are_named() {
        for (rules, says) in [
            (json!([{"field": "a", "check": "regex"}]), "rules[0].check"),
            (
                json!([{"field": "a", "check": "one_of"}]),
                "rules[0].values",
            ),
            (json!([{"check": "required"}]), "rules[0].field"),
            (
                json!([{"field": "a", "check": "required", "colour": 1}]),
                "rules[0].colour",
            ),
            (
                json!([{"field": "u", "check": "one_of", "values": ["a"], "aliases": {"b": "c"}}]),
                "rules[0].aliases.b",
            ),
            (json!([]), "`rules`"),
        ] {
            let e = run(json!({"rules": rules, "records": []}))
                .await
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{says}: {e}");
        }
        let e = run(json!({"rules": bom_rules(), "records": [1]}))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("records[0]"), "{e}");
    }
}
