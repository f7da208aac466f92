//! The fleet's plugins as tools: each device's catalog (its plugins with
//! their JSON Schemas and effects, [`crate::protocol::Catalog`], sent when
//! the scheduler asks with `ToAgent::Describe`) checked and kept per
//! device, and the fleet-wide list `GET /v1/tools` shows, agent runs give
//! a language model and MCP clients call.
//!
//! A catalog comes from a device, which is not trusted to be well-formed:
//! every declaration is checked (its name, the size of its schema, that
//! the schema parses in the form the agents write) and a bad one is left
//! out with a log line naming device, plugin and why; the rest count.

use crate::protocol::api::ToolView;
use crate::protocol::{Catalog, ToolDecl, MAX_CATALOG_PLUGINS, MAX_TOOL_SCHEMA_BYTES};
use crate::schema::{Effects, Schema};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Longest tool name a model or MCP client is given (OpenAI's limit).
pub const MAX_TOOL_NAME: usize = 64;

/// Checks a device's catalog: the declarations that pass, and why each
/// other one did not.
pub fn accept(catalog: Catalog) -> (Vec<ToolView>, Vec<String>) {
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for (i, d) in catalog.plugins.into_iter().enumerate() {
        if i >= MAX_CATALOG_PLUGINS {
            refused.push(format!(
                "more than {MAX_CATALOG_PLUGINS} plugins; the rest ignored"
            ));
            break;
        }
        let name = d.name.clone();
        match check(d) {
            Ok(t) if ok.iter().any(|o: &ToolView| o.name == t.name) => {
                refused.push(format!("plugin `{name}` listed twice"))
            }
            Ok(t) => ok.push(t),
            Err(why) => refused.push(format!("plugin `{}`: {why}", name.escape_debug())),
        }
    }
    (ok, refused)
}

fn check(d: ToolDecl) -> Result<ToolView, String> {
    if !valid_plugin_name(&d.name) {
        return Err("not a plugin name (1 to 64 of a-z, 0-9, `_` and `-`)".into());
    }
    if d.input_schema.len() > MAX_TOOL_SCHEMA_BYTES {
        return Err(format!(
            "its schema is {} bytes, more than {MAX_TOOL_SCHEMA_BYTES}",
            d.input_schema.len()
        ));
    }
    if d.description.len() > 4096 || d.version.len() > 64 {
        return Err("its description or version is too long".into());
    }
    let json: serde_json::Value =
        serde_json::from_str(&d.input_schema).map_err(|e| format!("schema is not JSON: {e}"))?;
    Schema::from_json(&json).map_err(|e| format!("schema: {e}"))?;
    Ok(ToolView {
        name: d.name,
        version: d.version,
        description: d.description,
        input_schema: json,
        effects: d.effects,
    })
}

/// Plugin names as the agents use them (built-ins and process plugins).
fn valid_plugin_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_TOOL_NAME
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// One tool of the fleet: a plugin on one device, under the name a model
/// calls it by.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FleetTool {
    /// The plugin's name where one device offers it, else qualified by the
    /// device (`sysinfo_pi-1`): at most [`MAX_TOOL_NAME`] of `[A-Za-z0-9_-]`.
    pub name: String,
    pub plugin: String,
    pub device: String,
    pub description: String,
    pub input_schema: serde_json::Value,
    pub effects: Effects,
    pub version: String,
}

/// The tools of `devices` (id and catalog, online ones only), sorted by
/// name: a plugin that one device offers keeps its name, one that several
/// offer gets one tool per device, named after both.
pub fn fleet<'a, I>(devices: I) -> Vec<FleetTool>
where
    I: IntoIterator<Item = (&'a str, &'a [ToolView])>,
{
    let mut by_plugin: BTreeMap<&str, Vec<(&str, &ToolView)>> = BTreeMap::new();
    for (dev, tools) in devices {
        for t in tools {
            by_plugin.entry(&t.name).or_default().push((dev, t));
        }
    }
    let mut out: Vec<FleetTool> = Vec::new();
    for (plugin, offers) in by_plugin {
        let single = offers.len() == 1;
        for (dev, t) in offers {
            let mut name = if single {
                plugin.to_string()
            } else {
                qualified(plugin, dev)
            };
            // Sanitising can make two names one (`a.b` and `a_b`): keep them apart.
            let mut n = 2;
            while out.iter().any(|o| o.name == name) {
                let suffix = format!("_{n}");
                name = format!("{}{suffix}", cut(&qualified(plugin, dev), suffix.len()));
                n += 1;
            }
            out.push(FleetTool {
                name,
                plugin: plugin.to_string(),
                device: dev.to_string(),
                description: t.description.clone(),
                input_schema: t.input_schema.clone(),
                effects: t.effects.clone(),
                version: t.version.clone(),
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// `plugin_device`, with what a tool name may not hold made `_`, cut to
/// [`MAX_TOOL_NAME`].
fn qualified(plugin: &str, device: &str) -> String {
    let s: String = format!("{plugin}_{device}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    cut(&s, 0).to_string()
}

fn cut(s: &str, room: usize) -> &str {
    &s[..s.len().min(MAX_TOOL_NAME - room)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::EffectRule;
    use serde_json::json;

    fn decl(name: &str, schema: &str) -> ToolDecl {
        ToolDecl {
            name: name.into(),
            version: "1".into(),
            description: "d".into(),
            input_schema: schema.into(),
            effects: Effects::None,
        }
    }

    #[test]
    fn bad_declarations_are_left_out_and_named() {
        let deep = "{\"items\":".repeat(200) + &"}".repeat(200);
        let (ok, bad) = accept(Catalog {
            plugins: vec![
                decl(
                    "sysinfo",
                    r#"{"type":"object","additionalProperties":false}"#,
                ),
                decl("Bad/Name", "{}"),
                decl("big", &" ".repeat(MAX_TOOL_SCHEMA_BYTES + 1)),
                decl("notjson", "{"),
                decl("pattern", r#"{"type":"string","pattern":"x"}"#),
                decl("deep", &deep),
                decl("sysinfo", "{}"),
            ],
        });
        assert_eq!(ok.len(), 1, "{bad:?}");
        assert_eq!(
            ok[0].input_schema,
            json!({"type":"object","additionalProperties":false})
        );
        let all = bad.join("\n");
        for w in [
            "Bad/Name",
            "`big`",
            "`notjson`",
            "pattern",
            "`deep`",
            "listed twice",
        ] {
            assert!(all.contains(w), "{w}: {all}");
        }
    }

    #[test]
    fn a_plugin_on_several_devices_is_one_tool_per_device() {
        let view = |n: &str| ToolView {
            name: n.into(),
            version: "1".into(),
            description: String::new(),
            input_schema: json!({}),
            effects: Effects::When(vec![EffectRule::given("body")]),
        };
        let a = [view("sysinfo"), view("gpio")];
        let b = [view("sysinfo")];
        let c = [view("sysinfo")];
        let tools = fleet([("pi-1", &a[..]), ("pi.2", &b[..]), ("pi_2", &c[..])]);
        let names: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            ["gpio", "sysinfo_pi-1", "sysinfo_pi_2", "sysinfo_pi_2_2"]
        );
        assert_eq!(tools[0].device, "pi-1");
        assert_eq!(
            serde_json::to_value(&tools[0].effects).unwrap(),
            json!({"when": [{"field": "body", "values": []}]})
        );
        let long = "d".repeat(64);
        let t = fleet([(long.as_str(), &b[..]), ("x", &c[..])]);
        assert!(t.iter().all(|t| t.name.len() <= MAX_TOOL_NAME), "{t:?}");
    }
}
