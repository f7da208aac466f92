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
use crate::schema::{builtin_effects, Effects, Schema};
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
        return Err(format!(
            "not a plugin name (1 to {MAX_PLUGIN_NAME} of a-z, 0-9, `_` and `-`, without `__`)"
        ));
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
    let mut schema = Schema::from_json(&json).map_err(|e| format!("schema: {e}"))?;
    if let Some(n) = hidden_name(&schema) {
        return Err(format!(
            "schema: `{n}` holds control or invisible characters"
        ));
    }
    // What reaches a model or an MCP client is the schema as we read it
    // (keywords we do not know dropped), its texts without control
    // characters: a device is not trusted to write for them.
    clean_schema(&mut schema);
    // A built-in plugin's effects are known here: a device cannot declare
    // `exec` harmless and skip the approval.
    let effects = match builtin_effects(&d.name) {
        Some(pinned) => d.effects.at_least(pinned),
        None => d.effects,
    };
    Ok(ToolView {
        name: d.name,
        version: clean_text(&d.version),
        description: clean_text(&d.description),
        input_schema: schema.to_json(),
        effects,
    })
}

/// Whether a model or a terminal would not show `c` as it is: control
/// characters (but newline and tab), bidi overrides and isolates,
/// zero-width and other format characters, line and paragraph
/// separators, Unicode tags (a known way to hide text from people).
fn hidden(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t')
        || matches!(c as u32,
            0xAD | 0x61C | 0x180E | 0x200B..=0x200F | 0x2028..=0x202E
            | 0x2060..=0x206F | 0xFEFF | 0xFFF9..=0xFFFB | 0xE0000..=0xE007F)
}

/// `s` without [`hidden`] characters.
fn clean_text(s: &str) -> String {
    s.chars().filter(|c| !hidden(*c)).collect()
}

/// The first name or value in `s` (property names, required fields, enum
/// values, case fields) that holds a [`hidden`] character: those are
/// matched against input, so they are refused rather than rewritten.
fn hidden_name(s: &Schema) -> Option<String> {
    let bad = |x: &str| x.chars().any(hidden);
    let names = s
        .properties
        .iter()
        .map(|(n, _)| n)
        .chain(&s.required)
        .chain(&s.one_of)
        .chain(s.cases.iter().flat_map(|c| {
            std::iter::once(&c.field)
                .chain(std::iter::once(&c.equals))
                .chain(&c.required)
        }));
    for n in names {
        if bad(n) {
            return Some(n.escape_debug().to_string());
        }
    }
    s.items
        .as_deref()
        .into_iter()
        .chain(s.properties.iter().map(|(_, p)| p))
        .find_map(hidden_name)
}

fn clean_schema(s: &mut Schema) {
    s.description = clean_text(&s.description);
    if let Some(i) = s.items.as_mut() {
        clean_schema(i);
    }
    for (_, p) in s.properties.iter_mut() {
        clean_schema(p);
    }
}

/// Longest plugin name a catalog may declare: its tool name also holds
/// the device (`plugin__device`, at most [`MAX_TOOL_NAME`]).
pub const MAX_PLUGIN_NAME: usize = 40;

/// Plugin names as the agents use them (built-ins and process plugins);
/// `__` separates plugin and device in a tool name, so not in one.
fn valid_plugin_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_PLUGIN_NAME
        && !n.contains("__")
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// One tool of the fleet: a plugin on one device, under the name a model
/// or an MCP client calls it by.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FleetTool {
    /// `plugin__device` ([`tool_name`]): at most [`MAX_TOOL_NAME`] of
    /// `[A-Za-z0-9_-]`, the same whichever other devices are online.
    pub name: String,
    pub plugin: String,
    pub device: String,
    pub description: String,
    pub input_schema: serde_json::Value,
    pub effects: Effects,
    pub version: String,
}

/// The name of `plugin` on `device`: `plugin__device`, or, where the
/// device's id holds characters a tool name may not or would make it too
/// long, `plugin__` and the id made fit, then `_` and 8 hex digits of its
/// sha256. A function of the two alone, so a name never changes with
/// which other devices are online, and one device cannot take another's.
pub fn tool_name(plugin: &str, device: &str) -> String {
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    let plain = format!("{plugin}__{device}");
    if plain.len() <= MAX_TOOL_NAME && device.chars().all(ok) && !device.is_empty() {
        return plain;
    }
    use sha2::Digest;
    let h = sha2::Sha256::digest(device.as_bytes());
    let tag = crate::hex(&h[..4]);
    let room = MAX_TOOL_NAME.saturating_sub(plugin.len() + 2 + 1 + tag.len());
    let dev: String = device
        .chars()
        .map(|c| if ok(c) { c } else { '_' })
        .take(room)
        .collect();
    format!("{plugin}__{dev}_{tag}")
}

/// The tools of `devices` (id and catalog), sorted by name, each named by
/// [`tool_name`]. Tools that would share a name (a device named to collide
/// with another's hashed name) are all left out, with a log line: neither
/// may answer to a name a client saw for the other.
pub fn fleet<'a, I>(devices: I) -> Vec<FleetTool>
where
    I: IntoIterator<Item = (&'a str, &'a [ToolView])>,
{
    let mut devices: Vec<(&str, &[ToolView])> = devices.into_iter().collect();
    devices.sort_by(|a, b| a.0.cmp(b.0));
    let mut out: BTreeMap<String, FleetTool> = BTreeMap::new();
    let mut taken = std::collections::BTreeSet::new();
    for (dev, tools) in devices {
        for t in tools {
            let name = tool_name(&t.name, dev);
            if taken.contains(&name) {
                continue;
            }
            if let Some(had) = out.remove(&name) {
                log::warn!(
                    "tool `{name}`: plugin `{}` of device `{}` and `{}` on `{}` have the same \
                     name; both left out",
                    t.name,
                    dev.escape_debug(),
                    had.plugin,
                    had.device.escape_debug()
                );
                taken.insert(name);
                continue;
            }
            out.insert(
                name.clone(),
                FleetTool {
                    name,
                    plugin: t.name.clone(),
                    device: dev.to_string(),
                    description: t.description.clone(),
                    input_schema: t.input_schema.clone(),
                    effects: t.effects.clone(),
                    version: t.version.clone(),
                },
            );
        }
    }
    out.into_values().collect()
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
    fn tool_names_are_stable_and_cannot_be_taken() {
        let view = |n: &str| ToolView {
            name: n.into(),
            version: "1".into(),
            description: String::new(),
            input_schema: json!({}),
            effects: Effects::When(vec![EffectRule::given("body")]),
        };
        let a = [view("sysinfo"), view("gpio")];
        let b = [view("sysinfo")];
        let hostile_id = tool_name("sysinfo", "pi.2")["sysinfo__".len()..].to_string();
        let names = |t: &[FleetTool]| t.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
        let all = fleet([
            ("pi-1", &a[..]),
            ("pi.2", &b[..]),
            ("pi_2", &b[..]),
            (hostile_id.as_str(), &b[..]),
        ]);
        let h = tool_name("sysinfo", "pi.2");
        assert!(h.starts_with("sysinfo__pi_2_") && h.len() == "sysinfo__pi_2_".len() + 8);
        assert_eq!(
            names(&all),
            ["gpio__pi-1", "sysinfo__pi-1", "sysinfo__pi_2"]
        );
        // The colliding devices are both left out, not renamed, whichever
        // sorts first.
        assert!(all
            .iter()
            .all(|t| t.device != hostile_id && t.device != "pi.2"));
        let z = format!("{}z", "a".repeat(60));
        let zname = tool_name("sysinfo", &z);
        let taker = zname["sysinfo__".len()..].to_string();
        assert!(taker < z);
        let t = fleet([(z.as_str(), &b[..]), (taker.as_str(), &b[..])]);
        assert!(t.is_empty(), "{t:?}");
        assert_eq!(
            serde_json::to_value(&all[0].effects).unwrap(),
            json!({"when": [{"field": "body", "values": []}]})
        );
        // Which other devices are there does not change a name.
        assert_eq!(names(&fleet([("pi_2", &b[..])])), ["sysinfo__pi_2"]);
        let long = "d".repeat(64);
        let t = fleet([(long.as_str(), &b[..]), ("x", &b[..])]);
        assert!(t.iter().all(|t| t.name.len() <= MAX_TOOL_NAME), "{t:?}");
        assert_eq!(t.len(), 2);
        let forty = "p".repeat(MAX_PLUGIN_NAME);
        assert!(tool_name(&forty, &long).len() <= MAX_TOOL_NAME);
    }

    #[test]
    fn a_device_cannot_make_a_builtin_harmless_or_write_control_characters() {
        let mut d = decl(
            "exec",
            r#"{"type":"object","title":{"x":1},"$schema":7,"description":"run\u001b[2J it","properties":{"command":{"type":"string","description":"a\u0007b"}}}"#,
        );
        d.description = "clears\u{1b}[2J the\u{202e} screen\u{200b}\nsecond line\u{e0041}".into();
        let hidden_prop = decl(
            "gpio",
            r#"{"type":"object","properties":{"pin\u202e":{"type":"string"}}}"#,
        );
        let hidden_enum = decl("file", r#"{"type":"string","enum":["read","\u001b[31m"]}"#);
        let (ok, bad) = accept(Catalog {
            plugins: vec![d, decl("a__b", "{}"), hidden_prop, hidden_enum],
        });
        assert_eq!(ok.len(), 1, "{bad:?}");
        assert!(bad[0].contains("a__b"), "{bad:?}");
        assert!(
            bad[1].contains("invisible") && bad[2].contains("invisible"),
            "{bad:?}"
        );
        let t = &ok[0];
        assert_eq!(t.effects, Effects::Always);
        assert_eq!(t.description, "clears[2J the screen\nsecond line");
        assert_eq!(
            t.input_schema,
            json!({"type": "object", "description": "run[2J it",
                   "properties": {"command": {"type": "string", "description": "ab"}}})
        );
    }
}
