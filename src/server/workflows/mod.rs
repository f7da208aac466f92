//! Workflows: a file (TOML, or the same as JSON) of steps with
//! dependencies, a DAG. Each step is a plugin task or a model call (an
//! `llm` task, as the OpenAI gateway makes them), its inputs templated from
//! the run's inputs and earlier steps' outputs ([`template`]), with its own
//! route, target or capability, retries and timeout; a final output is
//! built from the steps' outputs and checked against a schema.
//!
//! A definition is checked whole at submission ([`Workflow::parse`],
//! [`Workflow::check`]): duplicate ids, unknown steps in `needs` or in a
//! template, cycles, bad templates and unknown keys are refused with an
//! error naming the step and the field, and nothing is stored. The run
//! itself ([`runner`]) submits every step whose dependencies have
//! succeeded at once, stores each step's task id as soon as it exists
//! (`DATA/workflows.db`) and resumes after a restart by waiting for the
//! tasks already submitted.

mod routes;
pub mod runner;
mod store;
pub mod template;

use crate::protocol::api::Route;
use crate::schema::Schema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as J};
use std::collections::{HashMap, HashSet};

pub use routes::router;
pub use runner::{RunView, StepState, StepView, WorkflowState, Workflows};
pub use store::WorkflowsError;

/// Most steps in one workflow.
pub const MAX_STEPS: usize = 256;
/// Longest workflow file (and `POST` body), in bytes.
pub const MAX_FILE_BYTES: usize = 256 * 1024;
/// Most retries of one step, and most tokens of one model reply.
pub const MAX_RETRIES: u32 = 99;
pub const MAX_TOKENS: u32 = 8192;
/// Longest step timeout (a day).
pub const MAX_TIMEOUT_MS: u64 = 86_400_000;

/// Why a workflow definition (or a run's inputs) was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DefinitionError {
    #[error("the workflow is {bytes} bytes; at most {max}")]
    TooLarge { bytes: usize, max: usize },
    #[error("the workflow is not valid TOML: {0}")]
    Toml(String),
    /// A top-level field (`name`, `inputs`, `steps`, `output`).
    #[error("`{field}`: {message}")]
    Field { field: String, message: String },
    #[error("step `{step}`: {message}")]
    Step { step: String, message: String },
    /// The steps of a cycle, the first repeated at the end.
    #[error("step `{}`: a cycle: {}", .0[0], .0.join(" -> "))]
    Cycle(Vec<String>),
}

/// A workflow file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workflow {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Declared inputs with their defaults; a run may give others values.
    #[serde(default)]
    pub inputs: Map<String, J>,
    pub steps: Vec<StepDef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<OutputDef>,
}

/// One step: `plugin` (with `input`) or `model` (with `prompt`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepDef {
    pub id: String,
    /// Steps that must succeed first (those its templates name are implied).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
    /// A plugin step's input (templated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<J>,
    /// A model a heavy node serves: the step is an `llm` task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// A model step's user message (templated), and its system message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// A model step's output schema: the reply is held to it and parsed
    /// as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<J>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Run on this device (templated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Run on a device with this capability (templated; plugin steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capability: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<Route>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// Further dispatch attempts of the step's task (its `max_attempts`
    /// is `retries + 1`): after a lost device or a retryable failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// A plugin step whose task exists only once an operator approves the
    /// call it would make (`POST /v1/workflows/runs/{id}/approve`): a fix
    /// script a model proposed, a write to a machine.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub approve: bool,
    /// How long an approval is waited for (default [`DEFAULT_APPROVAL_MS`]);
    /// without one by then the step fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_timeout_ms: Option<u64>,
}

/// How long a step's approval is waited for unless it says otherwise.
pub const DEFAULT_APPROVAL_MS: u64 = 24 * 3600 * 1000;
/// The longest approval wait a step may ask for.
pub const MAX_APPROVAL_MS: u64 = 7 * 24 * 3600 * 1000;

impl StepDef {
    /// The step's templated fields, with their names.
    fn templated(&self) -> Vec<(&'static str, J)> {
        let mut v = Vec::new();
        let s = |x: &Option<String>| x.clone().map(J::String);
        for (name, val) in [
            ("input", self.input.clone()),
            ("prompt", s(&self.prompt)),
            ("system", s(&self.system)),
            ("target", s(&self.target)),
            ("capability", s(&self.capability)),
        ] {
            if let Some(val) = val {
                v.push((name, val));
            }
        }
        v
    }
}

/// The run's output: `value` (templated; by default the outputs of the
/// steps no other step needs, by id), checked against `schema`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputDef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<J>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<J>,
}

/// A checked workflow: each step's dependencies (indices), for the runner.
#[derive(Debug, Clone)]
pub struct Checked {
    pub wf: Workflow,
    pub deps: Vec<Vec<usize>>,
}

/// Most dotted parts of the keys on one line of a workflow file.
pub const MAX_KEY_DOTS: usize = 64;

/// Refuses lines with more than [`MAX_KEY_DOTS`] dots outside strings and
/// not between two digits (a float's): the toml crate bounds the nesting
/// of inline arrays and tables but not of dotted keys and headers, and
/// `a.a.a...` 100,000 levels deep overflowed the stack when read (and
/// dropped) recursively. A conservative scan: a string the scan takes for
/// a key only makes a clear refusal, never a crash.
fn check_key_depth(text: &str) -> Result<(), DefinitionError> {
    for (n, line) in text.lines().enumerate() {
        let b = line.as_bytes();
        let (mut dots, mut quote) = (0usize, None::<u8>);
        for (i, &c) in b.iter().enumerate() {
            match quote {
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None if c == b'"' || c == b'\'' => quote = Some(c),
                None if c == b'#' => break,
                None if c == b'.' => {
                    let digit = |j: Option<&u8>| j.is_some_and(|c| c.is_ascii_digit());
                    if !(i > 0 && digit(b.get(i - 1)) && digit(b.get(i + 1))) {
                        dots += 1;
                    }
                }
                None => {}
            }
        }
        if dots > MAX_KEY_DOTS {
            return Err(DefinitionError::Toml(format!(
                "line {}: {dots} dotted key parts; at most {MAX_KEY_DOTS}",
                n + 1
            )));
        }
    }
    Ok(())
}

const TOP_KEYS: &[&str] = &["name", "description", "inputs", "steps", "output"];

impl Workflow {
    /// Reads a workflow file's TOML.
    pub fn parse_toml(text: &str) -> Result<Workflow, DefinitionError> {
        if text.len() > MAX_FILE_BYTES {
            return Err(DefinitionError::TooLarge {
                bytes: text.len(),
                max: MAX_FILE_BYTES,
            });
        }
        check_key_depth(text)?;
        let v: J = toml::from_str(text).map_err(|e| DefinitionError::Toml(e.to_string()))?;
        Self::from_json(v)
    }

    /// Reads a workflow from its JSON form (the TOML file's data); each
    /// step on its own, so an error names the step.
    pub fn from_json(v: J) -> Result<Workflow, DefinitionError> {
        let field = |f: &str, m: String| DefinitionError::Field {
            field: f.into(),
            message: m,
        };
        let J::Object(mut top) = v else {
            return Err(field("workflow", "expected a table (an object)".into()));
        };
        for k in top.keys() {
            if !TOP_KEYS.contains(&k.as_str()) {
                return Err(field(
                    k,
                    format!("unknown field; expected one of {}", TOP_KEYS.join(", ")),
                ));
            }
        }
        let name = match top.remove("name") {
            Some(J::String(s)) => s,
            Some(_) => return Err(field("name", "expected a string".into())),
            None => return Err(field("name", "missing".into())),
        };
        let description = match top.remove("description") {
            None => None,
            Some(J::String(s)) => Some(s),
            Some(_) => return Err(field("description", "expected a string".into())),
        };
        let inputs = match top.remove("inputs") {
            None => Map::new(),
            Some(J::Object(m)) => m,
            Some(_) => return Err(field("inputs", "expected a table of defaults".into())),
        };
        let raw = match top.remove("steps") {
            Some(J::Array(a)) => a,
            Some(_) => return Err(field("steps", "expected an array of tables".into())),
            None => return Err(field("steps", "missing: at least one [[steps]]".into())),
        };
        if raw.len() > MAX_STEPS {
            return Err(field(
                "steps",
                format!("{} steps; at most {MAX_STEPS}", raw.len()),
            ));
        }
        let mut steps = Vec::with_capacity(raw.len());
        for (i, s) in raw.into_iter().enumerate() {
            let id = s
                .get("id")
                .and_then(J::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| format!("steps[{i}]"));
            let step: StepDef = serde_json::from_value(s).map_err(|e| DefinitionError::Step {
                step: id,
                message: e.to_string(),
            })?;
            steps.push(step);
        }
        let output = match top.remove("output") {
            None => None,
            Some(o) => Some(
                serde_json::from_value::<OutputDef>(o)
                    .map_err(|e| field("output", e.to_string()))?,
            ),
        };
        Ok(Workflow {
            name,
            description,
            inputs,
            steps,
            output,
        })
    }

    /// Checks the whole definition; its dependency graph.
    pub fn check(self) -> Result<Checked, DefinitionError> {
        let field = |f: &str, m: String| DefinitionError::Field {
            field: f.into(),
            message: m,
        };
        if self.name.trim().is_empty() || self.name.len() > 128 {
            return Err(field("name", "1 to 128 bytes of text".into()));
        }
        if self.steps.is_empty() {
            return Err(field("steps", "at least one step".into()));
        }
        for k in self.inputs.keys() {
            if !template::is_name(k) {
                return Err(field(
                    &format!("inputs.{k}"),
                    "an input's name is 1 to 64 letters, digits, `_` or `-`".into(),
                ));
            }
        }
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (i, s) in self.steps.iter().enumerate() {
            if !template::is_name(&s.id) {
                return Err(DefinitionError::Step {
                    step: s.id.clone(),
                    message: "`id`: 1 to 64 letters, digits, `_` or `-`".into(),
                });
            }
            if index.insert(&s.id, i).is_some() {
                return Err(DefinitionError::Step {
                    step: s.id.clone(),
                    message: "`id`: a second step with this id".into(),
                });
            }
        }
        let mut deps = Vec::with_capacity(self.steps.len());
        for s in &self.steps {
            let bad = |m: String| DefinitionError::Step {
                step: s.id.clone(),
                message: m,
            };
            check_step(s).map_err(bad)?;
            let mut d: Vec<usize> = Vec::new();
            let mut add = |id: &str, at: &str| -> Result<(), DefinitionError> {
                if id == s.id {
                    return Err(bad(format!("`{at}`: a step cannot depend on itself")));
                }
                match index.get(id) {
                    Some(&j) => {
                        if !d.contains(&j) {
                            d.push(j);
                        }
                        Ok(())
                    }
                    None => Err(bad(format!("`{at}`: no step `{id}` in the workflow"))),
                }
            };
            for n in &s.needs {
                add(n, "needs")?;
            }
            for (name, val) in s.templated() {
                for (at, r) in template::refs(&val, name).map_err(bad)? {
                    match r {
                        template::Ref::Input(n) if !self.inputs.contains_key(&n) => {
                            return Err(bad(format!(
                                "`{at}`: no input `{n}` (declare it under [inputs])"
                            )))
                        }
                        template::Ref::Input(_) => {}
                        template::Ref::Step { id, .. } => add(&id, &at)?,
                    }
                }
            }
            deps.push(d);
        }
        if let Some(cycle) = find_cycle(&deps) {
            return Err(DefinitionError::Cycle(
                cycle.iter().map(|&i| self.steps[i].id.clone()).collect(),
            ));
        }
        if let Some(o) = &self.output {
            if let Some(s) = &o.schema {
                Schema::from_json(s).map_err(|e| field("output.schema", e.to_string()))?;
            }
            if let Some(v) = &o.value {
                for (at, r) in
                    template::refs(v, "output.value").map_err(|e| field("output.value", e))?
                {
                    let ok = match &r {
                        template::Ref::Input(n) => self.inputs.contains_key(n),
                        template::Ref::Step { id, .. } => index.contains_key(id.as_str()),
                    };
                    if !ok {
                        return Err(field(&at, format!("`{r}`: no such input or step")));
                    }
                }
            }
        }
        Ok(Checked { wf: self, deps })
    }

    /// The run's inputs: the declared defaults, overridden by `given`.
    pub fn inputs_with(&self, given: &Map<String, J>) -> Result<Map<String, J>, DefinitionError> {
        let mut all = self.inputs.clone();
        for (k, v) in given {
            if !self.inputs.contains_key(k) {
                return Err(DefinitionError::Field {
                    field: format!("inputs.{k}"),
                    message: "not an input the workflow declares under [inputs]".into(),
                });
            }
            all.insert(k.clone(), v.clone());
        }
        Ok(all)
    }
}

fn check_step(s: &StepDef) -> Result<(), String> {
    match (&s.plugin, &s.model) {
        (None, None) => return Err("neither `plugin` nor `model`: a step is one of them".into()),
        (Some(_), Some(_)) => return Err("both `plugin` and `model`: a step is one of them".into()),
        (Some(p), None) => {
            if p.is_empty() || p.len() > 64 {
                return Err("`plugin`: a plugin name".into());
            }
            for (k, given) in [
                ("prompt", s.prompt.is_some()),
                ("system", s.system.is_some()),
                ("schema", s.schema.is_some()),
                ("max_tokens", s.max_tokens.is_some()),
            ] {
                if given {
                    return Err(format!("`{k}` is for model steps, not plugin steps"));
                }
            }
        }
        (None, Some(m)) => {
            if m.is_empty() || m.len() > 128 {
                return Err("`model`: a model name".into());
            }
            if s.prompt.as_deref().is_none_or(|p| p.trim().is_empty()) {
                return Err("`prompt`: a model step needs one".into());
            }
            if s.input.is_some() {
                return Err("`input` is for plugin steps; a model step has `prompt`".into());
            }
            if s.capability.is_some() {
                return Err(
                    "`capability` is for plugin steps (a model step runs where its model is served)"
                        .into(),
                );
            }
            if let Some(t) = s.max_tokens {
                if t == 0 || t > MAX_TOKENS {
                    return Err(format!("`max_tokens`: 1 to {MAX_TOKENS}, not {t}"));
                }
            }
            if let Some(sc) = &s.schema {
                Schema::from_json(sc).map_err(|e| format!("`schema`: {e}"))?;
            }
            if s.approve || s.approval_timeout_ms.is_some() {
                return Err(
                    "`approve` is for plugin steps (a model step only answers; the step that acts on its answer needs the approval)"
                        .into(),
                );
            }
        }
    }
    if let Some(t) = s.approval_timeout_ms {
        if !s.approve {
            return Err("`approval_timeout_ms` without `approve = true`".into());
        }
        if t == 0 || t > MAX_APPROVAL_MS {
            return Err(format!(
                "`approval_timeout_ms`: 1 to {MAX_APPROVAL_MS}, not {t}"
            ));
        }
    }
    if let Some(r) = s.retries {
        if r > MAX_RETRIES {
            return Err(format!("`retries`: 0 to {MAX_RETRIES}, not {r}"));
        }
    }
    if let Some(t) = s.timeout_ms {
        if t == 0 || t > MAX_TIMEOUT_MS {
            return Err(format!("`timeout_ms`: 1 to {MAX_TIMEOUT_MS}, not {t}"));
        }
    }
    if let Some(p) = s.priority {
        if p > 100 {
            return Err(format!("`priority`: 0 to 100, not {p}"));
        }
    }
    if s.needs.len() > MAX_STEPS {
        return Err(format!("`needs`: at most {MAX_STEPS} steps"));
    }
    Ok(())
}

/// A cycle in the graph (`deps[i]`: what step `i` needs), as the steps on
/// it with the first repeated at the end.
fn find_cycle(deps: &[Vec<usize>]) -> Option<Vec<usize>> {
    // Depth first, without recursion (256 steps deep is fine either way,
    // but the order of the stack gives the cycle's path).
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut mark = vec![Mark::New; deps.len()];
    for start in 0..deps.len() {
        if mark[start] != Mark::New {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        mark[start] = Mark::Open;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some(&d) = deps[node].get(*next) {
                *next += 1;
                match mark[d] {
                    Mark::New => {
                        mark[d] = Mark::Open;
                        stack.push((d, 0));
                    }
                    Mark::Open => {
                        let from = stack.iter().position(|&(n, _)| n == d).unwrap_or(0);
                        let mut c: Vec<usize> = stack[from..].iter().map(|&(n, _)| n).collect();
                        c.push(d);
                        return Some(c);
                    }
                    Mark::Done => {}
                }
            } else {
                mark[node] = Mark::Done;
                stack.pop();
            }
        }
    }
    None
}

/// The steps no other step depends on (the default output's).
pub(crate) fn sinks(deps: &[Vec<usize>]) -> Vec<usize> {
    let needed: HashSet<usize> = deps.iter().flatten().copied().collect();
    (0..deps.len()).filter(|i| !needed.contains(i)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(toml: &str) -> Result<Checked, DefinitionError> {
        Workflow::parse_toml(toml)?.check()
    }

    /// From a review: 100,000 dotted key parts overflowed the stack. On a
    /// 2 MiB thread, as tokio's are.
    #[test]
    fn deep_dotted_keys_are_refused_before_they_are_read() {
        let deep = format!("name = \"w\"\n{}a = 1\n", "a.".repeat(100_000));
        let header = format!("[{}a]\n", "a.".repeat(100_000));
        let r = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                (
                    Workflow::parse_toml(&deep).unwrap_err().to_string(),
                    Workflow::parse_toml(&header).unwrap_err().to_string(),
                )
            })
            .unwrap()
            .join()
            .unwrap();
        assert!(r.0.contains("line 2: 100000 dotted key parts"), "{}", r.0);
        assert!(r.1.contains("line 1: 100000 dotted key parts"), "{}", r.1);
        // Floats and dots in strings are not key parts.
        let floats: Vec<String> = (0..100).map(|i| format!("{i}.5")).collect();
        let ok = format!(
            "x = [{}]\ny = \"{}\"\n",
            floats.join(", "),
            "a.".repeat(100)
        );
        check_key_depth(&ok).unwrap();
    }

    #[test]
    fn a_dag_parses_with_deps_from_needs_and_templates() {
        let c = check(
            r#"
name = "inventory"
[inputs]
device = "pi-1"
[[steps]]
id = "cpu"
plugin = "sysinfo"
target = "{{ inputs.device }}"
retries = 2
timeout_ms = 5000
route = "edge"
[[steps]]
id = "echo"
plugin = "echo"
input = { n = "{{ steps.cpu.output.cpus }}" }
[[steps]]
id = "last"
plugin = "echo"
needs = ["cpu", "echo"]
[output]
value = { cpus = "{{ steps.echo.output.n }}" }
schema = { type = "object" }
"#,
        )
        .unwrap();
        assert_eq!(c.deps, vec![vec![], vec![0], vec![0, 1]]);
        assert_eq!(sinks(&c.deps), vec![2]);
    }

    #[test]
    fn bad_definitions_are_refused_naming_the_step() {
        let base = "name = \"w\"\n";
        for (body, want) in [
            (
                "[[steps]]\nid = \"a\"\nplugin = \"echo\"\nneeds = [\"b\"]\n[[steps]]\nid = \"b\"\nplugin = \"echo\"\nneeds = [\"a\"]\n",
                "a cycle: a -> b -> a",
            ),
            (
                "[[steps]]\nid = \"a\"\nplugin = \"echo\"\nneeds = [\"zz\"]\n",
                "step `a`: `needs`: no step `zz`",
            ),
            (
                "[[steps]]\nid = \"a\"\nplugin = \"echo\"\n[[steps]]\nid = \"a\"\nplugin = \"echo\"\n",
                "step `a`: `id`: a second step",
            ),
            (
                "[[steps]]\nid = \"a\"\nplugin = \"echo\"\n[[steps]]\nid = \"b\"\nplugin = \"echo\"\ninput = { x = \"{{ steps.a.result }}\" }\n",
                "step `b`: `input.x`",
            ),
            (
                "[[steps]]\nid = \"a\"\nplugin = \"echo\"\ninput = \"{{ steps.q.output }}\"\n",
                "step `a`: `input`: no step `q`",
            ),
            ("[[steps]]\nid = \"a\"\n", "step `a`: neither"),
            (
                "[[steps]]\nid = \"a\"\nplugin = \"echo\"\nmodel = \"m\"\n",
                "step `a`: both",
            ),
            (
                "[[steps]]\nid = \"a\"\nplugin = \"echo\"\nroute = \"fast\"\n",
                "step `a`: unknown variant `fast`",
            ),
            (
                "[[steps]]\nid = \"a\"\nplugin = \"echo\"\nretry = 1\n",
                "step `a`: unknown field `retry`",
            ),
            (
                "[[steps]]\nid = \"a\"\nplugin = \"echo\"\ntarget = \"{{ inputs.dev }}\"\n",
                "step `a`: `target`: no input `dev`",
            ),
            (
                "[[steps]]\nid = \"a\"\nmodel = \"m\"\nprompt = \"p\"\napprove = true\n",
                "step `a`: `approve` is for plugin steps",
            ),
            (
                "[[steps]]\nid = \"a\"\nplugin = \"echo\"\napproval_timeout_ms = 5\n",
                "step `a`: `approval_timeout_ms` without `approve = true`",
            ),
            (
                "[[steps]]\nid = \"a\"\nplugin = \"echo\"\napprove = true\napproval_timeout_ms = 0\n",
                "step `a`: `approval_timeout_ms`: 1 to",
            ),
            ("steps = []\n", "`steps`: at least one"),
            ("wat = 1\n[[steps]]\nid = \"a\"\nplugin = \"echo\"\n", "`wat`: unknown field"),
        ] {
            let e = check(&format!("{base}{body}")).unwrap_err().to_string();
            assert!(e.contains(want), "want {want:?} in: {e}");
        }
        let many: String = (0..=MAX_STEPS)
            .map(|i| format!("[[steps]]\nid = \"s{i}\"\nplugin = \"echo\"\n"))
            .collect();
        let e = check(&format!("{base}{many}")).unwrap_err().to_string();
        assert!(e.contains("at most 256"), "{e}");
    }

    #[test]
    fn the_example_file_passes_the_check() {
        let c = check(include_str!("../../../examples/workflows/inventory.toml")).unwrap();
        assert_eq!(c.deps.len(), 4);
        assert_eq!(sinks(&c.deps), vec![3]);
    }

    #[test]
    fn a_longer_cycle_is_named_whole() {
        let deps = vec![vec![1], vec![2], vec![3], vec![1]];
        assert_eq!(find_cycle(&deps), Some(vec![1, 2, 3, 1]));
        assert_eq!(find_cycle(&[vec![], vec![0], vec![0, 1]]), None);
    }
}
