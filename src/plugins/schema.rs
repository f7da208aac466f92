//! Input declarations: what a plugin accepts, in a JSON-Schema-like form the
//! agent checks before `execute` runs (wrong types, missing fields, values
//! out of range or not in an enum, unknown fields), so a bad task is refused
//! before it is queued, with an error naming the plugin and the field (a
//! path such as `values[3]` or `headers.accept`). Checks that need more
//! than the shape (a path escaping a root, a pin that exists) stay in
//! `execute`. [`Schema::to_json`] renders it as JSON Schema (2020-12).

use super::PluginError;
use crate::protocol::Value;
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

    /// Checks `input`; the error names `plugin` and the field's path.
    pub fn check(&self, plugin: &str, input: &Value) -> Result<(), PluginError> {
        self.check_at(input, "input")
            .map_err(|(field, message)| PluginError::InvalidInput {
                plugin: plugin.into(),
                field,
                message,
            })
    }

    fn check_at(&self, v: &Value, path: &str) -> Result<(), (String, String)> {
        let err = |m: String| Err((path.to_string(), m));
        if !self.kinds.is_empty() && !self.kinds.iter().any(|k| k.matches(v)) {
            let names: Vec<&str> = self.kinds.iter().map(|k| k.name()).collect();
            return err(format!("expected {}", names.join(" or ")));
        }
        match v {
            Value::Int(_) | Value::Float(_) => {
                let x = super::util::as_f64(v).unwrap_or(f64::NAN);
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
                    if matches!(v.get(name), None | Some(Value::Null)) {
                        return Err((join(path, name), "missing (required)".into()));
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
        schema().check("p", &v(j)).unwrap_err().to_string()
    }

    #[test]
    fn accepts_what_it_declares() {
        let s = schema();
        s.check("p", &v(json!({"op": "read"}))).unwrap();
        s.check("p", &v(json!({"op": "read", "count": 125, "h": {"x": 1}})))
            .unwrap();
        s.check("p", &v(json!({"op": "write", "values": [0, 65535]})))
            .unwrap();
        // Null is "not given".
        s.check("p", &v(json!({"op": "read", "count": null})))
            .unwrap();
        Schema::any().check("p", &v(json!([1, "x"]))).unwrap();
    }

    #[test]
    fn errors_name_plugin_and_field() {
        let e = err(json!({}));
        assert!(
            e.contains("`p`") && e.contains("`op`") && e.contains("missing"),
            "{e}"
        );
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
