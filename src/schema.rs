//! Input declarations: what a plugin accepts, in a JSON-Schema-like form the
//! agent checks before `execute` runs (wrong types, missing fields, values
//! out of range or not in an enum, unknown fields), so a bad task is refused
//! before it is queued, with an error naming the plugin and the field (a
//! path such as `values[3]` or `headers.accept`). Checks that need more
//! than the shape (a path escaping a root, a pin that exists) stay in
//! `execute`. [`Schema::to_json`] renders it as JSON Schema (2020-12) and
//! [`Schema::from_json`] reads that form back: a device's catalog carries
//! its plugins' schemas that way, and the server checks a tool call's
//! arguments with the same [`Schema::validate`] the agent runs
//! (`server::tools`). [`Effects`] says which calls change the world.

use crate::protocol::Value;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// JSON type names a schema may accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Null,
    Boolean,
    Integer,
    Number,
    String,
    Array,
    Object,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::Boolean => "boolean",
            Kind::Integer => "integer",
            Kind::Number => "number",
            Kind::String => "string",
            Kind::Array => "array",
            Kind::Object => "object",
        }
    }

    fn matches(self, v: &Value) -> bool {
        match self {
            Kind::Null => matches!(v, Value::Null),
            Kind::Boolean => matches!(v, Value::Bool(_)),
            Kind::Integer => matches!(v, Value::Int(_)),
            Kind::Number => matches!(v, Value::Int(_) | Value::Float(_)),
            Kind::String => matches!(v, Value::Str(_)),
            Kind::Array => matches!(v, Value::List(_) | Value::Bytes(_)),
            Kind::Object => matches!(v, Value::Map(_)),
        }
    }
}

/// When `field` equals `equals`, `required` must be present too.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    pub field: String,
    pub equals: String,
    pub required: Vec<String>,
}

/// Why a value does not match a schema: the field's path (`input` for the
/// whole value, else a path such as `values[3]` or `headers.accept`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("`{field}`: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

/// Whether a plugin's tasks change the world (run a command, write a file
/// or a register, send a request with a body), so that an agent run asks a
/// person before it makes such a call. Declared by the plugin, carried in
/// the device's catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Effects {
    /// Reads only (sysinfo, sensor reads, inference).
    #[default]
    None,
    /// Every task (exec, process).
    Always,
    /// A task whose input matches any of these (file `op` = `write`).
    When(Vec<EffectRule>),
}

/// One case of [`Effects::When`]: `field` (a top-level input field) is one
/// of `values`, or, with no values, is given at all (not null).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EffectRule {
    pub field: String,
    pub values: Vec<String>,
}

impl EffectRule {
    /// `field` one of `values`.
    pub fn one_of(field: &str, values: &[&str]) -> EffectRule {
        EffectRule {
            field: field.into(),
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }
    /// `field` given.
    pub fn given(field: &str) -> EffectRule {
        EffectRule {
            field: field.into(),
            values: Vec::new(),
        }
    }
}

/// The effects of a built-in plugin: what the plugin declares, and what
/// the server holds a device's catalog to (a device cannot declare its
/// `exec` harmless). None for other names (process plugins, say).
pub fn builtin_effects(plugin: &str) -> Option<Effects> {
    Some(match plugin {
        // run a command or a program; send messages to other systems
        "exec" | "publish" => Effects::Always,
        // writes, moves and deletes change files
        "file" => Effects::When(vec![EffectRule::one_of("op", &["write", "move", "delete"])]),
        // drives pins
        "gpio" => Effects::When(vec![EffectRule::one_of("op", &["write", "pulse"])]),
        // a request with a body or a method that is not a read
        "http" => Effects::When(vec![
            EffectRule::one_of("method", &["POST", "PUT", "PATCH", "DELETE"]),
            EffectRule::given("body"),
            EffectRule::given("json"),
        ]),
        // writes registers and coils
        "modbus" => Effects::When(vec![EffectRule::one_of(
            "op",
            &[
                "write_register",
                "write_registers",
                "write_coil",
                "write_coils",
            ],
        )]),
        _ => return None,
    })
}

impl Effects {
    /// These effects and `other`'s: a call has effects if either says so.
    pub fn at_least(self, other: Effects) -> Effects {
        match (self, other) {
            (Effects::Always, _) | (_, Effects::Always) => Effects::Always,
            (Effects::None, e) | (e, Effects::None) => e,
            (Effects::When(mut a), Effects::When(b)) => {
                for r in b {
                    if !a.contains(&r) {
                        a.push(r);
                    }
                }
                Effects::When(a)
            }
        }
    }

    /// Whether a task with this input changes the world. A rule's field
    /// that is given but not a string matches a rule with values: a value
    /// the plugin would refuse is not evidence of a harmless call.
    pub fn applies(&self, input: &Value) -> bool {
        match self {
            Effects::None => false,
            Effects::Always => true,
            Effects::When(rules) => rules.iter().any(|r| match input.get(&r.field) {
                None | Some(Value::Null) => false,
                Some(_) if r.values.is_empty() => true,
                Some(Value::Str(s)) => r.values.iter().any(|v| v == s),
                Some(_) => true,
            }),
        }
    }
}

/// A declaration of accepted input (one node of a JSON-Schema-like tree).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Schema {
    /// Accepted types; empty accepts any.
    pub kinds: Vec<Kind>,
    pub description: String,
    /// Inclusive numeric range.
    pub minimum: Option<f64>,
    pub maximum: Option<f64>,
    /// Length bounds of arrays (and strings).
    pub min_len: Option<usize>,
    pub max_len: Option<usize>,
    /// Allowed string values; empty allows any.
    pub one_of: Vec<String>,
    /// Schema of every array item.
    pub items: Option<Box<Schema>>,
    /// Known fields of an object, in declaration order.
    pub properties: Vec<(String, Schema)>,
    pub required: Vec<String>,
    /// Fields other than `properties` allowed (objects only).
    pub additional: bool,
    pub cases: Vec<Case>,
}

impl Schema {
    /// Anything at all.
    pub fn any() -> Schema {
        Schema {
            additional: true,
            ..Schema::default()
        }
    }
    /// One of these types.
    pub fn of(kinds: &[Kind]) -> Schema {
        Schema {
            kinds: kinds.to_vec(),
            additional: true,
            ..Schema::default()
        }
    }
    /// An object with only the fields declared with [`Schema::field`].
    pub fn object() -> Schema {
        Schema {
            kinds: vec![Kind::Object],
            ..Schema::default()
        }
    }
    pub fn string() -> Schema {
        Schema::of(&[Kind::String])
    }
    pub fn boolean() -> Schema {
        Schema::of(&[Kind::Boolean])
    }
    pub fn number() -> Schema {
        Schema::of(&[Kind::Number])
    }
    /// An integer in `min..=max`.
    pub fn integer(min: i64, max: i64) -> Schema {
        Schema::of(&[Kind::Integer]).range(min as f64, max as f64)
    }
    /// A string from `values`.
    pub fn enumeration<S: AsRef<str>>(values: &[S]) -> Schema {
        let mut s = Schema::string();
        s.one_of = values.iter().map(|v| v.as_ref().to_string()).collect();
        s
    }
    /// An array of `items`.
    pub fn array(items: Schema) -> Schema {
        Schema {
            items: Some(Box::new(items)),
            ..Schema::of(&[Kind::Array])
        }
    }

    pub fn desc(mut self, d: &str) -> Schema {
        self.description = d.to_string();
        self
    }
    pub fn range(mut self, min: f64, max: f64) -> Schema {
        self.minimum = Some(min);
        self.maximum = Some(max);
        self
    }
    pub fn len(mut self, min: usize, max: usize) -> Schema {
        self.min_len = Some(min);
        self.max_len = Some(max);
        self
    }
    /// Declares an optional field.
    pub fn field(mut self, name: &str, s: Schema) -> Schema {
        self.properties.push((name.to_string(), s));
        self
    }
    /// Declares a required field.
    pub fn req(mut self, name: &str, s: Schema) -> Schema {
        self.required.push(name.to_string());
        self.field(name, s)
    }
    /// Fields required when `field` is `equals` (e.g. per `op`).
    pub fn when(mut self, field: &str, equals: &str, required: &[&str]) -> Schema {
        self.cases.push(Case {
            field: field.into(),
            equals: equals.into(),
            required: required.iter().map(|s| s.to_string()).collect(),
        });
        self
    }
    /// Allows fields beyond the declared ones.
    pub fn open(mut self) -> Schema {
        self.additional = true;
        self
    }

    /// Checks `input`; the error names the field's path (`input` for the
    /// whole value).
    pub fn validate(&self, input: &Value) -> Result<(), Invalid> {
        self.check_at(input, "input")
            .map_err(|(field, message)| Invalid { field, message })
    }

    fn check_at(&self, v: &Value, path: &str) -> Result<(), (String, String)> {
        let err = |m: String| Err((path.to_string(), m));
        if !self.kinds.is_empty() && !self.kinds.iter().any(|k| k.matches(v)) {
            let names: Vec<&str> = self.kinds.iter().map(|k| k.name()).collect();
            return err(format!("expected {}", names.join(" or ")));
        }
        match v {
            Value::Int(_) | Value::Float(_) => {
                let x = match v {
                    Value::Int(i) => *i as f64,
                    Value::Float(f) => *f,
                    _ => f64::NAN,
                };
                if !x.is_finite() {
                    return err("expected a finite number".into());
                }
                let lo = self.minimum.unwrap_or(f64::NEG_INFINITY);
                let hi = self.maximum.unwrap_or(f64::INFINITY);
                if x < lo || x > hi {
                    return err(format!(
                        "{} is out of range ({})",
                        fmt_num(x),
                        self.range_text()
                    ));
                }
            }
            Value::Str(s) => {
                if !self.one_of.is_empty() && !self.one_of.iter().any(|o| o == s) {
                    return err(format!("`{s}` is not one of: {}", self.one_of.join(", ")));
                }
                self.check_len(s.chars().count(), path, "characters")?;
            }
            Value::List(items) => {
                self.check_len(items.len(), path, "items")?;
                if let Some(is) = &self.items {
                    for (i, item) in items.iter().enumerate() {
                        is.check_at(item, &format!("{}[{i}]", sub(path)))?;
                    }
                }
            }
            Value::Bytes(b) => self.check_len(b.len(), path, "items")?,
            Value::Map(entries) => {
                for name in &self.required {
                    // Null is "not given" (as in the plugins), unless the
                    // property's own type admits null: `"type": ["string",
                    // "null"]` is JSON Schema's way to say "present, maybe empty".
                    let admits_null = self
                        .properties
                        .iter()
                        .any(|(n, s)| n == name && s.kinds.contains(&Kind::Null));
                    match v.get(name) {
                        None => return Err((join(path, name), "missing (required)".into())),
                        Some(Value::Null) if !admits_null => {
                            return Err((join(path, name), "missing (required)".into()))
                        }
                        _ => {}
                    }
                }
                for c in &self.cases {
                    if matches!(v.get(&c.field), Some(Value::Str(s)) if *s == c.equals) {
                        for name in &c.required {
                            if matches!(v.get(name), None | Some(Value::Null)) {
                                return Err((
                                    join(path, name),
                                    format!(
                                        "missing (required when `{}` is `{}`)",
                                        c.field, c.equals
                                    ),
                                ));
                            }
                        }
                    }
                }
                for (k, val) in entries {
                    match self.properties.iter().find(|(n, _)| n == k) {
                        // Null stands for "not given", as in the plugins.
                        Some(_) if matches!(val, Value::Null) => {}
                        Some((_, s)) => s.check_at(val, &join(path, k))?,
                        None if self.additional => {}
                        None => {
                            let known: Vec<&str> =
                                self.properties.iter().map(|(n, _)| n.as_str()).collect();
                            return Err((
                                join(path, k),
                                format!("unknown field (known: {})", known.join(", ")),
                            ));
                        }
                    }
                }
            }
            Value::Null | Value::Bool(_) => {}
        }
        Ok(())
    }

    fn check_len(&self, n: usize, path: &str, what: &str) -> Result<(), (String, String)> {
        if self.min_len.is_some_and(|m| n < m) || self.max_len.is_some_and(|m| n > m) {
            return Err((
                path.to_string(),
                format!(
                    "{n} {what}, expected {} to {}",
                    self.min_len.unwrap_or(0),
                    self.max_len.map_or("any".to_string(), |m| m.to_string())
                ),
            ));
        }
        Ok(())
    }

    fn range_text(&self) -> String {
        match (self.minimum, self.maximum) {
            (Some(a), Some(b)) => format!("{} to {}", fmt_num(a), fmt_num(b)),
            (Some(a), None) => format!("at least {}", fmt_num(a)),
            (None, Some(b)) => format!("at most {}", fmt_num(b)),
            (None, None) => "any".into(),
        }
    }

    /// The declaration as JSON Schema (2020-12 keywords).
    pub fn to_json(&self) -> serde_json::Value {
        let mut o = serde_json::Map::new();
        match self.kinds.as_slice() {
            [] => {}
            [k] => {
                o.insert("type".into(), k.name().into());
            }
            ks => {
                o.insert(
                    "type".into(),
                    ks.iter().map(|k| k.name()).collect::<Vec<_>>().into(),
                );
            }
        }
        if !self.description.is_empty() {
            o.insert("description".into(), self.description.clone().into());
        }
        if let Some(m) = self.minimum {
            o.insert("minimum".into(), num_json(m));
        }
        if let Some(m) = self.maximum {
            o.insert("maximum".into(), num_json(m));
        }
        let (lo, hi) = if self.kinds == [Kind::String] {
            ("minLength", "maxLength")
        } else {
            ("minItems", "maxItems")
        };
        if let Some(m) = self.min_len {
            o.insert(lo.into(), m.into());
        }
        if let Some(m) = self.max_len {
            o.insert(hi.into(), m.into());
        }
        if !self.one_of.is_empty() {
            o.insert("enum".into(), self.one_of.clone().into());
        }
        if let Some(i) = &self.items {
            o.insert("items".into(), i.to_json());
        }
        if !self.properties.is_empty() {
            let props: serde_json::Map<String, serde_json::Value> = self
                .properties
                .iter()
                .map(|(n, s)| (n.clone(), s.to_json()))
                .collect();
            o.insert("properties".into(), props.into());
        }
        if !self.required.is_empty() {
            o.insert("required".into(), self.required.clone().into());
        }
        if self.kinds.contains(&Kind::Object) && !self.additional {
            o.insert("additionalProperties".into(), false.into());
        }
        if !self.cases.is_empty() {
            let all: Vec<serde_json::Value> = self
                .cases
                .iter()
                .map(|c| {
                    json!({
                        "if": {"properties": {c.field.clone(): {"const": c.equals}}, "required": [c.field]},
                        "then": {"required": c.required},
                    })
                })
                .collect();
            o.insert("allOf".into(), all.into());
        }
        serde_json::Value::Object(o)
    }
}

/// Deepest nesting [`Schema::from_json`] reads.
pub const MAX_SCHEMA_DEPTH: usize = 32;

impl Schema {
    /// Reads the JSON Schema form [`Schema::to_json`] writes, and refuses
    /// anything else (a keyword it does not know, a value of the wrong
    /// type), so a schema never means less than it says. The error names
    /// the place (`properties.op.enum`).
    pub fn from_json(j: &serde_json::Value) -> Result<Schema, Invalid> {
        Self::read(j, "schema", 0)
    }

    fn read(j: &serde_json::Value, at: &str, depth: usize) -> Result<Schema, Invalid> {
        use serde_json::Value as J;
        let bad = |field: String, m: &str| Invalid {
            field,
            message: m.to_string(),
        };
        if depth > MAX_SCHEMA_DEPTH {
            return Err(bad(at.into(), "nested too deep"));
        }
        let J::Object(o) = j else {
            return Err(bad(at.into(), "a schema must be an object"));
        };
        let mut s = Schema::any();
        let key = |k: &str| format!("{at}.{k}");
        let count = |v: &J, k: &str| -> Result<usize, Invalid> {
            v.as_u64()
                .map(|n| n.min(usize::MAX as u64) as usize)
                .ok_or_else(|| bad(key(k), "expected a non-negative integer"))
        };
        let strings = |v: &J, k: &str| -> Result<Vec<String>, Invalid> {
            v.as_array()
                .and_then(|a| a.iter().map(|x| x.as_str().map(String::from)).collect())
                .ok_or_else(|| bad(key(k), "expected a list of strings"))
        };
        for (k, v) in o {
            match k.as_str() {
                "type" => {
                    let names = match v {
                        J::String(t) => vec![t.clone()],
                        _ => strings(v, k)?,
                    };
                    s.kinds.clear();
                    for n in names {
                        let kind = match n.as_str() {
                            "null" => Kind::Null,
                            "boolean" => Kind::Boolean,
                            "integer" => Kind::Integer,
                            "number" => Kind::Number,
                            "string" => Kind::String,
                            "array" => Kind::Array,
                            "object" => Kind::Object,
                            _ => return Err(bad(key(k), &format!("unknown type `{n}`"))),
                        };
                        if !s.kinds.contains(&kind) {
                            s.kinds.push(kind);
                        }
                    }
                }
                "description" => {
                    s.description = v
                        .as_str()
                        .ok_or_else(|| bad(key(k), "expected a string"))?
                        .into()
                }
                "minimum" | "maximum" => {
                    let x = v.as_f64().ok_or_else(|| bad(key(k), "expected a number"))?;
                    if k == "minimum" {
                        s.minimum = Some(x);
                    } else {
                        s.maximum = Some(x);
                    }
                }
                "minLength" | "minItems" => s.min_len = Some(count(v, k)?),
                "maxLength" | "maxItems" => s.max_len = Some(count(v, k)?),
                "enum" => s.one_of = strings(v, k)?,
                "items" => s.items = Some(Box::new(Self::read(v, &key(k), depth + 1)?)),
                "properties" => {
                    let J::Object(props) = v else {
                        return Err(bad(key(k), "expected an object"));
                    };
                    for (name, p) in props {
                        let sub = Self::read(p, &format!("{at}.properties.{name}"), depth + 1)?;
                        s.properties.push((name.clone(), sub));
                    }
                }
                "required" => s.required = strings(v, k)?,
                "additionalProperties" => {
                    s.additional = v
                        .as_bool()
                        .ok_or_else(|| bad(key(k), "expected true or false"))?
                }
                "allOf" => {
                    let all = v.as_array().ok_or_else(|| bad(key(k), "expected a list"))?;
                    for (i, c) in all.iter().enumerate() {
                        s.cases.push(Self::read_case(c).ok_or_else(|| {
                            bad(
                                format!("{at}.allOf[{i}]"),
                                "expected {\"if\": {\"properties\": {F: {\"const\": V}}, \
                                 \"required\": [F]}, \"then\": {\"required\": [...]}}",
                            )
                        })?);
                    }
                }
                "$schema" | "title" => {}
                other => return Err(bad(key(other), "keyword not supported")),
            }
        }
        Ok(s)
    }

    fn read_case(c: &serde_json::Value) -> Option<Case> {
        let cond = c.get("if")?.get("properties")?.as_object()?;
        if cond.len() != 1 || c.as_object()?.len() != 2 {
            return None;
        }
        let (field, v) = cond.iter().next()?;
        let equals = v.get("const")?.as_str()?.to_string();
        let required = c
            .get("then")?
            .get("required")?
            .as_array()?
            .iter()
            .map(|x| x.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()?;
        Some(Case {
            field: field.clone(),
            equals,
            required,
        })
    }
}

fn sub(path: &str) -> &str {
    if path == "input" {
        ""
    } else {
        path
    }
}

fn join(path: &str, field: &str) -> String {
    if path == "input" {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn fmt_num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

fn num_json(x: f64) -> serde_json::Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        (x as i64).into()
    } else {
        x.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(j: serde_json::Value) -> Value {
        Value::from(j)
    }

    fn schema() -> Schema {
        Schema::object()
            .req("op", Schema::enumeration(&["read", "write"]))
            .field("count", Schema::integer(1, 125))
            .field("values", Schema::array(Schema::integer(0, 65535)).len(1, 3))
            .field("h", Schema::object().open())
            .when("op", "write", &["values"])
    }

    fn err(j: serde_json::Value) -> String {
        schema().validate(&v(j)).unwrap_err().to_string()
    }

    #[test]
    fn accepts_what_it_declares() {
        let s = schema();
        s.validate(&v(json!({"op": "read"}))).unwrap();
        s.validate(&v(json!({"op": "read", "count": 125, "h": {"x": 1}})))
            .unwrap();
        s.validate(&v(json!({"op": "write", "values": [0, 65535]})))
            .unwrap();
        // Null is "not given".
        s.validate(&v(json!({"op": "read", "count": null})))
            .unwrap();
        Schema::any().validate(&v(json!([1, "x"]))).unwrap();
        // A required property whose type admits null may be null; one whose
        // type does not is still missing.
        let j = json!({"type": "object", "required": ["m", "n"], "properties": {
            "m": {"type": ["string", "null"]}, "n": {"type": "string"}}});
        let s = Schema::from_json(&j).unwrap();
        s.validate(&v(json!({"m": null, "n": "x"}))).unwrap();
        let e = s
            .validate(&v(json!({"m": "a", "n": null})))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`n`") && e.contains("missing"), "{e}");
        let e = s.validate(&v(json!({"n": "x"}))).unwrap_err().to_string();
        assert!(e.contains("`m`") && e.contains("missing"), "{e}");
    }

    #[test]
    fn errors_name_the_field() {
        let e = err(json!({}));
        assert!(e.contains("`op`") && e.contains("missing"), "{e}");
        let e = err(json!({"op": "erase"}));
        assert!(
            e.contains("`op`") && e.contains("not one of: read, write"),
            "{e}"
        );
        let e = err(json!({"op": "read", "count": 0}));
        assert!(
            e.contains("`count`") && e.contains("out of range (1 to 125)"),
            "{e}"
        );
        let e = err(json!({"op": "read", "count": 1.5}));
        assert!(
            e.contains("`count`") && e.contains("expected integer"),
            "{e}"
        );
        let e = err(json!({"op": "write"}));
        assert!(
            e.contains("`values`") && e.contains("when `op` is `write`"),
            "{e}"
        );
        let e = err(json!({"op": "write", "values": [1, 70000]}));
        assert!(e.contains("`values[1]`"), "{e}");
        let e = err(json!({"op": "write", "values": [1, 2, 3, 4]}));
        assert!(e.contains("`values`") && e.contains("4 items"), "{e}");
        let e = err(json!({"op": "read", "cuont": 2}));
        assert!(e.contains("`cuont`") && e.contains("unknown field"), "{e}");
        let e = err(json!([1]));
        assert!(
            e.contains("`input`") && e.contains("expected object"),
            "{e}"
        );
    }

    #[test]
    fn reads_back_what_it_renders_and_nothing_else() {
        let s = schema();
        let back = Schema::from_json(&s.to_json()).unwrap();
        assert_eq!(back.to_json(), s.to_json());
        // (Fields come back in key order; what they accept is the same.)
        for j in [
            json!({"op": "write"}),
            json!({"op": "read", "count": 0}),
            json!({"op": "read"}),
        ] {
            assert_eq!(back.validate(&v(j.clone())), s.validate(&v(j)));
        }
        let e = Schema::from_json(&json!({"type": "string", "pattern": "a+"})).unwrap_err();
        assert_eq!(e.field, "schema.pattern");
        let e = Schema::from_json(&json!({"properties": {"x": {"type": "strin"}}})).unwrap_err();
        assert!(e.to_string().contains("properties.x.type"), "{e}");
        let mut deep = json!({});
        for _ in 0..100 {
            deep = json!({ "items": deep });
        }
        let e = Schema::from_json(&deep).unwrap_err();
        assert!(e.to_string().contains("too deep"), "{e}");
    }

    #[test]
    fn effects_follow_their_rules() {
        let e = Effects::When(vec![
            EffectRule::one_of("op", &["write", "delete"]),
            EffectRule::given("body"),
        ]);
        assert!(!e.applies(&v(json!({"op": "read"}))));
        assert!(e.applies(&v(json!({"op": "write"}))));
        assert!(e.applies(&v(json!({"op": "read", "body": "x"}))));
        assert!(!e.applies(&v(json!({"op": "read", "body": null}))));
        // Not a string: not taken as harmless.
        assert!(e.applies(&v(json!({"op": 3}))));
        assert!(Effects::Always.applies(&Value::Null));
        assert!(!Effects::None.applies(&v(json!({"op": "write"}))));
    }

    #[test]
    fn renders_json_schema() {
        let j = schema().to_json();
        assert_eq!(j["type"], "object");
        assert_eq!(j["required"], json!(["op"]));
        assert_eq!(j["properties"]["count"]["maximum"], 125);
        assert_eq!(j["properties"]["values"]["maxItems"], 3);
        assert_eq!(j["additionalProperties"], false);
        assert_eq!(j["allOf"][0]["then"]["required"], json!(["values"]));
    }
}
