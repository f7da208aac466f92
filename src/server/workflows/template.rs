//! The template language of workflow files, kept tiny and strict:
//! `{{ inputs.NAME }}` and `{{ steps.ID.output[.FIELD...] }}` (a field
//! that is a number indexes an array). A string that is exactly one
//! template takes the referenced JSON value as it is; a template inside
//! other text is rendered as text (a string as is, anything else as JSON).

use serde_json::{Map, Value as J};
use std::collections::HashMap;

/// What a template refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ref {
    Input(String),
    Step { id: String, path: Vec<String> },
}

impl std::fmt::Display for Ref {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Ref::Input(n) => write!(f, "inputs.{n}"),
            Ref::Step { id, path } => {
                write!(f, "steps.{id}.output")?;
                for p in path {
                    write!(f, ".{p}")?;
                }
                Ok(())
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Ref(Ref),
}

/// A name of an input, a step or a field: letters, digits, `_` and `-`.
pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn parse_ref(expr: &str) -> Result<Ref, String> {
    let form = "a template is `{{ inputs.NAME }}` or `{{ steps.ID.output[.FIELD...] }}`";
    let parts: Vec<&str> = expr.split('.').collect();
    match parts.as_slice() {
        ["inputs", name] if is_name(name) => Ok(Ref::Input(name.to_string())),
        ["steps", id, "output", path @ ..] if is_name(id) && path.iter().all(|p| is_name(p)) => {
            Ok(Ref::Step {
                id: id.to_string(),
                path: path.iter().map(|p| p.to_string()).collect(),
            })
        }
        _ => Err(format!("`{{{{ {expr} }}}}`: {form}")),
    }
}

fn parse(s: &str) -> Result<Vec<Part>, String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find("{{") {
        if i > 0 {
            out.push(Part::Text(rest[..i].to_string()));
        }
        let after = &rest[i + 2..];
        let Some(j) = after.find("}}") else {
            return Err(format!("`{{{{` without its `}}}}` in {s:?}"));
        };
        out.push(Part::Ref(parse_ref(after[..j].trim())?));
        rest = &after[j + 2..];
    }
    if !rest.is_empty() {
        out.push(Part::Text(rest.to_string()));
    }
    Ok(out)
}

/// Every reference in the strings of `v` (object keys are not templates);
/// an error names the place (`at`, then the path into `v`).
pub fn refs(v: &J, at: &str) -> Result<Vec<(String, Ref)>, String> {
    let mut out = Vec::new();
    walk(v, at, &mut |s, at| {
        for p in parse(s).map_err(|e| format!("`{at}`: {e}"))? {
            if let Part::Ref(r) = p {
                out.push((at.to_string(), r));
            }
        }
        Ok(())
    })?;
    Ok(out)
}

fn walk(
    v: &J,
    at: &str,
    f: &mut dyn FnMut(&str, &str) -> Result<(), String>,
) -> Result<(), String> {
    match v {
        J::String(s) => f(s, at),
        J::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                walk(x, &format!("{at}[{i}]"), f)?;
            }
            Ok(())
        }
        J::Object(o) => {
            for (k, x) in o {
                walk(x, &format!("{at}.{k}"), f)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// What templates are rendered from: the run's inputs and the outputs of
/// the steps that have succeeded.
pub struct Context<'a> {
    pub inputs: &'a Map<String, J>,
    pub outputs: &'a HashMap<String, J>,
}

/// Most bytes one rendering may make (a step's input, the final output):
/// each reference copies what it names, so without a bound a request of
/// 512 KiB naming a big input 20,000 times made gigabytes.
pub const MAX_RENDERED_BYTES: usize = 4 << 20;

/// About the bytes of `v` as JSON, stopping once past `limit`.
fn json_size(v: &J, limit: usize) -> usize {
    let mut n = 0usize;
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        n = n.saturating_add(match v {
            J::String(s) => s.len() + 2,
            J::Array(a) => {
                stack.extend(a.iter());
                a.len() + 2
            }
            J::Object(o) => {
                for (k, x) in o {
                    n = n.saturating_add(k.len() + 4);
                    stack.push(x);
                }
                2
            }
            _ => 8,
        });
        if n > limit {
            return n;
        }
    }
    n
}

impl<'a> Context<'a> {
    fn lookup(&self, r: &Ref) -> Result<&'a J, String> {
        match r {
            Ref::Input(n) => self
                .inputs
                .get(n)
                .ok_or_else(|| format!("`{r}`: no input `{n}`")),
            Ref::Step { id, path } => {
                let mut v = self
                    .outputs
                    .get(id)
                    .ok_or_else(|| format!("`{r}`: step `{id}` has no output"))?;
                let mut at = format!("steps.{id}.output");
                for p in path {
                    let next = match v {
                        J::Object(o) => o.get(p),
                        J::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get(i)),
                        _ => None,
                    };
                    v = next.ok_or_else(|| {
                        let what = match v {
                            J::Object(_) => format!("it has no field `{p}`"),
                            J::Array(a) => format!("`{p}` is not an index below {}", a.len()),
                            J::Null => "it is null".into(),
                            J::Bool(_) | J::Number(_) => "it is a number or a bool".into(),
                            J::String(_) => "it is a string".into(),
                        };
                        format!("`{r}`: `{at}`: {what}")
                    })?;
                    at = format!("{at}.{p}");
                }
                Ok(v)
            }
        }
    }

    /// `v` with its templates replaced; an error names the place. What it
    /// makes is bounded by [`MAX_RENDERED_BYTES`].
    pub fn render(&self, v: &J, at: &str) -> Result<J, String> {
        let mut left = MAX_RENDERED_BYTES;
        self.render_in(v, at, &mut left)
    }

    fn charge(left: &mut usize, bytes: usize, at: &str) -> Result<(), String> {
        *left = left.checked_sub(bytes).ok_or_else(|| {
            format!("`{at}`: the rendered value is over {MAX_RENDERED_BYTES} bytes")
        })?;
        Ok(())
    }

    fn render_in(&self, v: &J, at: &str, left: &mut usize) -> Result<J, String> {
        match v {
            J::String(s) => {
                let parts = parse(s).map_err(|e| format!("`{at}`: {e}"))?;
                match parts.as_slice() {
                    [Part::Ref(r)] => {
                        let v = self.lookup(r).map_err(|e| format!("`{at}`: {e}"))?;
                        Self::charge(left, json_size(v, *left), at)?;
                        Ok(v.clone())
                    }
                    _ => {
                        let mut out = String::new();
                        for p in parts {
                            match p {
                                Part::Text(t) => {
                                    Self::charge(left, t.len(), at)?;
                                    out.push_str(&t)
                                }
                                Part::Ref(r) => {
                                    let v = self.lookup(&r).map_err(|e| format!("`{at}`: {e}"))?;
                                    Self::charge(left, json_size(v, *left), at)?;
                                    match v {
                                        J::String(s) => out.push_str(s),
                                        other => out.push_str(&other.to_string()),
                                    }
                                }
                            }
                        }
                        Ok(J::String(out))
                    }
                }
            }
            J::Array(a) => a
                .iter()
                .enumerate()
                .map(|(i, x)| self.render_in(x, &format!("{at}[{i}]"), left))
                .collect::<Result<Vec<_>, _>>()
                .map(J::Array),
            J::Object(o) => {
                let mut m = Map::new();
                for (k, x) in o {
                    m.insert(k.clone(), self.render_in(x, &format!("{at}.{k}"), left)?);
                }
                Ok(J::Object(m))
            }
            other => Ok(other.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_whole_template_keeps_its_value_and_an_embedded_one_is_text() {
        let inputs = json!({"device": "pi-1"}).as_object().unwrap().clone();
        let mut outputs = HashMap::new();
        outputs.insert("cpu".to_string(), json!({"cpus": 4, "list": [1, 2]}));
        let c = Context {
            inputs: &inputs,
            outputs: &outputs,
        };
        let v = json!({"n": "{{ steps.cpu.output.cpus }}", "t": "has {{steps.cpu.output.cpus}} on {{ inputs.device }}",
                       "o": "{{ steps.cpu.output }}", "i": "{{ steps.cpu.output.list.1 }}", "k": 3});
        let r = c.render(&v, "input").unwrap();
        assert_eq!(
            r,
            json!({"n": 4, "t": "has 4 on pi-1", "o": {"cpus": 4, "list": [1, 2]}, "i": 2, "k": 3})
        );
        let e = c
            .render(&json!({"x": "{{ steps.cpu.output.nope }}"}), "input")
            .unwrap_err();
        assert!(
            e.contains("`input.x`") && e.contains("no field `nope`"),
            "{e}"
        );
    }

    /// From a review: 20,000 references to a 200 KB input made 4 GB.
    #[test]
    fn what_a_rendering_makes_is_bounded() {
        let inputs = json!({"x": "A".repeat(200_000)})
            .as_object()
            .unwrap()
            .clone();
        let outputs = HashMap::new();
        let c = Context {
            inputs: &inputs,
            outputs: &outputs,
        };
        let many = J::Array(vec![json!("{{ inputs.x }}"); 20_000]);
        let e = c.render(&many, "input").unwrap_err();
        assert!(
            e.contains("over 4194304 bytes") && e.contains("`input["),
            "{e}"
        );
        let text = json!("{{ inputs.x }}".repeat(30));
        assert!(c.render(&text, "input").unwrap_err().contains("over"));
        // Under the bound, rendered.
        assert_eq!(
            c.render(&many[0], "input").unwrap().as_str().unwrap().len(),
            200_000
        );
    }

    #[test]
    fn bad_templates_are_refused_naming_the_place() {
        for (s, want) in [
            ("{{ steps.a.result }}", "`{{ steps.a.result }}`"),
            ("{{ inputs }}", "a template is"),
            ("x {{ inputs.a", "without its"),
            ("{{ steps.a.output..b }}", "a template is"),
        ] {
            let e = refs(&json!({"f": s}), "input").unwrap_err();
            assert!(e.contains("`input.f`") && e.contains(want), "{s}: {e}");
        }
        let r = refs(&json!(["{{ inputs.a }} {{ steps.b.output.c }}"]), "p").unwrap();
        assert_eq!(
            r,
            vec![
                ("p[0]".to_string(), Ref::Input("a".into())),
                (
                    "p[0]".to_string(),
                    Ref::Step {
                        id: "b".into(),
                        path: vec!["c".into()]
                    }
                )
            ]
        );
    }
}
