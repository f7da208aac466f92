//! `file`: read, write, list, hash, move and delete files inside one
//! configured root folder.
//!
//! Every path is relative to `root`; `..`, absolute paths and symlinks that
//! lead out of the root are refused. Existing paths are canonicalized and
//! must stay under the canonical root; for paths that may not exist yet
//! (write, the destination of move) the parent is canonicalized instead.

use super::schema::Schema;
use super::util::{base64_decode, base64_encode};
use super::util::{blocking, cfg_str, cfg_u64, config_err, failed, map, Input};
use super::{check_keys, Plugin, PluginError, TaskContext};
use crate::protocol::Value;
use async_trait::async_trait;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Component, Path, PathBuf};

const NAME: &str = "file";

/// The file plugin.
#[derive(Debug, Clone)]
pub struct FilePlugin {
    root: PathBuf,
    max_read_bytes: u64,
    max_write_bytes: u64,
    max_list_entries: u64,
}

impl FilePlugin {
    /// Config keys: `root` (required, an existing folder), `max_read_bytes`
    /// (default 1 MiB), `max_write_bytes` (default 1 MiB), `max_list_entries`
    /// (default 10000).
    pub fn from_config(config: &toml::Table) -> Result<FilePlugin, PluginError> {
        check_keys(
            NAME,
            config,
            &[
                "root",
                "max_read_bytes",
                "max_write_bytes",
                "max_list_entries",
            ],
        )?;
        let root = cfg_str(NAME, config, "root")?
            .ok_or_else(|| config_err(NAME, "root", "required: the folder tasks may use"))?;
        let root = Path::new(&root)
            .canonicalize()
            .map_err(|e| config_err(NAME, "root", format!("{root}: {e}")))?;
        Ok(FilePlugin {
            root,
            max_read_bytes: cfg_u64(NAME, config, "max_read_bytes", 1 << 20, 1, 1 << 30)?,
            max_write_bytes: cfg_u64(NAME, config, "max_write_bytes", 1 << 20, 1, 1 << 30)?,
            max_list_entries: cfg_u64(NAME, config, "max_list_entries", 10_000, 1, 1 << 20)?,
        })
    }

    /// Checks `rel` is a plain relative path (no `..`, not absolute).
    fn plain<'p>(&self, field: &str, rel: &'p str) -> Result<&'p Path, PluginError> {
        let p = Path::new(rel);
        if rel.is_empty()
            || p.is_absolute()
            || p.components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(super::util::invalid(
                NAME,
                field,
                format!(
                    "`{rel}` must be a plain relative path inside the root (no `..`, not absolute)"
                ),
            ));
        }
        Ok(p)
    }

    /// An existing path: canonical form (symlinks followed) must be inside root.
    fn existing(&self, field: &str, rel: &str) -> Result<PathBuf, PluginError> {
        let p = self.plain(field, rel)?;
        let full = self
            .root
            .join(p)
            .canonicalize()
            .map_err(|e| super::util::invalid(NAME, field, format!("`{rel}`: {e}")))?;
        if !full.starts_with(&self.root) {
            return Err(super::util::invalid(
                NAME,
                field,
                format!("`{rel}` leads outside the root"),
            ));
        }
        Ok(full)
    }

    /// A path that may not exist yet: its parent must canonicalize inside
    /// root; if it exists as a symlink, the link's target must be inside too.
    /// Returns the path with the canonical parent (the link itself, not its target).
    fn new_path(&self, field: &str, rel: &str) -> Result<PathBuf, PluginError> {
        let p = self.plain(field, rel)?;
        let name = p
            .file_name()
            .ok_or_else(|| super::util::invalid(NAME, field, format!("`{rel}` names no file")))?;
        let parent = self.root.join(p.parent().unwrap_or(Path::new("")));
        let parent = parent.canonicalize().map_err(|e| {
            super::util::invalid(NAME, field, format!("parent folder of `{rel}`: {e}"))
        })?;
        if !parent.starts_with(&self.root) {
            return Err(super::util::invalid(
                NAME,
                field,
                format!("`{rel}` leads outside the root"),
            ));
        }
        let full = parent.join(name);
        if let Ok(meta) = std::fs::symlink_metadata(&full) {
            if meta.file_type().is_symlink() {
                // A dangling link or one pointing out would let a write escape.
                match full.canonicalize() {
                    Ok(t) if t.starts_with(&self.root) => {}
                    _ => {
                        return Err(super::util::invalid(
                            NAME,
                            field,
                            format!("`{rel}` is a symlink leading outside the root"),
                        ))
                    }
                }
            }
        }
        Ok(full)
    }

    fn run(&self, input: &Input) -> Result<Value, PluginError> {
        let op = input.str("op")?;
        match op {
            "read" => self.read(input),
            "write" => self.write(input),
            "list" => self.list(input),
            "hash" => self.hash(input),
            "move" => self.rename(input),
            "delete" => self.delete(input),
            other => Err(input.err(
                "op",
                format!("`{other}` is not one of read, write, list, hash, move, delete"),
            )),
        }
    }

    fn read(&self, input: &Input) -> Result<Value, PluginError> {
        let rel = input.str("path")?;
        let path = self.existing("path", rel)?;
        let encoding = input.opt_str("encoding")?.unwrap_or("utf8");
        if !matches!(encoding, "utf8" | "base64") {
            return Err(input.err("encoding", "expected `utf8` or `base64`"));
        }
        let meta = std::fs::metadata(&path).map_err(|e| input.err("path", e.to_string()))?;
        if !meta.is_file() {
            return Err(input.err("path", format!("`{rel}` is not a regular file")));
        }
        if meta.len() > self.max_read_bytes {
            return Err(input.err(
                "path",
                format!(
                    "`{rel}` has {} bytes, more than max_read_bytes ({})",
                    meta.len(),
                    self.max_read_bytes
                ),
            ));
        }
        // Read at most limit+1 bytes: the file may grow after the stat.
        let mut buf = Vec::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(self.max_read_bytes + 1).read_to_end(&mut buf))
            .map_err(|e| failed(NAME, format!("reading `{rel}`: {e}")))?;
        if buf.len() as u64 > self.max_read_bytes {
            return Err(input.err("path", format!("`{rel}` grew past max_read_bytes")));
        }
        let size = buf.len() as i64;
        let content = if encoding == "base64" {
            base64_encode(&buf)
        } else {
            String::from_utf8(buf).map_err(|_| {
                input.err(
                    "encoding",
                    format!("`{rel}` is not UTF-8 text; use encoding `base64`"),
                )
            })?
        };
        Ok(map(vec![
            ("path", Value::Str(rel.into())),
            ("size", Value::Int(size)),
            ("encoding", Value::Str(encoding.into())),
            ("content", Value::Str(content)),
        ]))
    }

    fn write(&self, input: &Input) -> Result<Value, PluginError> {
        let rel = input.str("path")?;
        let path = self.new_path("path", rel)?;
        let bytes = match (input.get("content"), input.get("content_base64")) {
            (Some(Value::Str(s)), None) => s.clone().into_bytes(),
            (None, Some(Value::Str(s))) => {
                base64_decode(s).map_err(|m| input.err("content_base64", m))?
            }
            (Some(_), None) => return Err(input.err("content", "expected a string")),
            (None, Some(_)) => return Err(input.err("content_base64", "expected a string")),
            _ => {
                return Err(input.err(
                    "content",
                    "give exactly one of `content` (text) or `content_base64`",
                ))
            }
        };
        if bytes.len() as u64 > self.max_write_bytes {
            return Err(input.err(
                "content",
                format!(
                    "{} bytes, more than max_write_bytes ({})",
                    bytes.len(),
                    self.max_write_bytes
                ),
            ));
        }
        let append = input.opt_bool("append")?.unwrap_or(false);
        if path.is_dir() {
            return Err(input.err("path", format!("`{rel}` is a folder")));
        }
        // Not a link when checked: refuse one planted since (O_NOFOLLOW).
        let was_link = path
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink());
        let res = {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut o = std::fs::OpenOptions::new();
            o.write(true).create(true);
            if append {
                o.append(true);
            } else {
                o.truncate(true);
            }
            if !was_link {
                o.custom_flags(libc::O_NOFOLLOW);
            }
            o.open(&path).and_then(|mut f| f.write_all(&bytes))
        };
        res.map_err(|e| failed(NAME, format!("writing `{rel}`: {e}")))?;
        Ok(map(vec![
            ("path", Value::Str(rel.into())),
            ("written", Value::Int(bytes.len() as i64)),
        ]))
    }

    fn list(&self, input: &Input) -> Result<Value, PluginError> {
        let rel = input.opt_str("path")?.unwrap_or(".");
        let dir = self.existing("path", rel)?;
        let rd = std::fs::read_dir(&dir).map_err(|e| input.err("path", format!("`{rel}`: {e}")))?;
        let mut entries = Vec::new();
        let mut truncated = false;
        for e in rd {
            let e = e.map_err(|e| failed(NAME, format!("listing `{rel}`: {e}")))?;
            if entries.len() as u64 >= self.max_list_entries {
                truncated = true;
                break;
            }
            let meta = e
                .path()
                .symlink_metadata()
                .map_err(|err| failed(NAME, format!("listing `{rel}`: {err}")))?;
            let kind = if meta.file_type().is_symlink() {
                "symlink"
            } else if meta.is_dir() {
                "dir"
            } else {
                "file"
            };
            entries.push((
                e.file_name().to_string_lossy().into_owned(),
                kind,
                meta.len(),
            ));
        }
        entries.sort();
        Ok(map(vec![
            ("path", Value::Str(rel.into())),
            (
                "entries",
                Value::List(
                    entries
                        .into_iter()
                        .map(|(name, kind, size)| {
                            map(vec![
                                ("name", Value::Str(name)),
                                ("type", Value::Str(kind.into())),
                                ("size", Value::Int(size as i64)),
                            ])
                        })
                        .collect(),
                ),
            ),
            ("truncated", Value::Bool(truncated)),
        ]))
    }

    fn hash(&self, input: &Input) -> Result<Value, PluginError> {
        let rel = input.str("path")?;
        let path = self.existing("path", rel)?;
        if !path.is_file() {
            return Err(input.err("path", format!("`{rel}` is not a regular file")));
        }
        let mut f = std::fs::File::open(&path)
            .map_err(|e| failed(NAME, format!("opening `{rel}`: {e}")))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut size: u64 = 0;
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| failed(NAME, format!("reading `{rel}`: {e}")))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            h.update(&buf[..n]);
        }
        let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Ok(map(vec![
            ("path", Value::Str(rel.into())),
            ("size", Value::Int(size as i64)),
            ("sha256", Value::Str(hex)),
        ]))
    }

    /// The path of an existing entry itself (a symlink is not followed), after
    /// checking that what it leads to is inside root.
    fn existing_entry(&self, field: &str, rel: &str) -> Result<PathBuf, PluginError> {
        self.existing(field, rel)?;
        let entry = self.new_path(field, rel)?;
        if entry == self.root {
            return Err(super::util::invalid(NAME, field, "the root itself"));
        }
        Ok(entry)
    }

    fn rename(&self, input: &Input) -> Result<Value, PluginError> {
        let from_rel = input.str("from")?;
        let to_rel = input.str("to")?;
        let from = self.existing_entry("from", from_rel)?;
        let to = self.new_path("to", to_rel)?;
        let overwrite = input.opt_bool("overwrite")?.unwrap_or(false);
        if to.symlink_metadata().is_ok() && !overwrite {
            return Err(input.err(
                "to",
                format!("`{to_rel}` exists; set `overwrite: true` to replace it"),
            ));
        }
        std::fs::rename(&from, &to)
            .map_err(|e| failed(NAME, format!("moving `{from_rel}` to `{to_rel}`: {e}")))?;
        Ok(map(vec![
            ("from", Value::Str(from_rel.into())),
            ("to", Value::Str(to_rel.into())),
        ]))
    }

    fn delete(&self, input: &Input) -> Result<Value, PluginError> {
        let rel = input.str("path")?;
        let path = self.existing_entry("path", rel)?;
        let meta = path
            .symlink_metadata()
            .map_err(|e| input.err("path", format!("`{rel}`: {e}")))?;
        // Folders only when empty: no recursive deletes from a task.
        let res = if meta.is_dir() {
            std::fs::remove_dir(&path)
        } else {
            std::fs::remove_file(&path)
        };
        res.map_err(|e| failed(NAME, format!("deleting `{rel}`: {e}")))?;
        Ok(map(vec![
            ("path", Value::Str(rel.into())),
            ("deleted", Value::Bool(true)),
        ]))
    }
}

#[async_trait]
impl Plugin for FilePlugin {
    fn name(&self) -> &'static str {
        NAME
    }

    fn input_schema(&self) -> Schema {
        let path = || Schema::string().len(1, 4096);
        Schema::object()
            .req(
                "op",
                Schema::enumeration(&["read", "write", "list", "hash", "move", "delete"]),
            )
            .field("path", path().desc("relative to the configured root"))
            .field("encoding", Schema::enumeration(&["utf8", "base64"]))
            .field("content", Schema::string().desc("text to write"))
            .field("content_base64", Schema::string().desc("bytes to write"))
            .field("append", Schema::boolean())
            .field("from", path())
            .field("to", path())
            .field("overwrite", Schema::boolean())
            .when("op", "read", &["path"])
            .when("op", "write", &["path"])
            .when("op", "hash", &["path"])
            .when("op", "delete", &["path"])
            .when("op", "move", &["from", "to"])
    }

    fn concurrency(&self) -> usize {
        4
    }

    fn validate(&self) -> Result<(), PluginError> {
        if !self.root.is_dir() {
            return Err(config_err(
                NAME,
                "root",
                format!("{} is not a folder", self.root.display()),
            ));
        }
        Ok(())
    }

    async fn execute(&self, task: TaskContext) -> Result<Value, PluginError> {
        Input::new(NAME, &task.input)?;
        let me = self.clone();
        let value = task.input.clone();
        blocking(NAME, &task, move || {
            let input = Input::new(NAME, &value)?;
            me.run(&input)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plugin(root: &Path, extra: &str) -> FilePlugin {
        let t: toml::Table =
            toml::from_str(&format!("root = {:?}\n{extra}", root.display().to_string())).unwrap();
        FilePlugin::from_config(&t).unwrap()
    }

    fn run(p: &FilePlugin, v: serde_json::Value) -> Result<serde_json::Value, String> {
        let v = Value::from(v);
        let input = Input::new(NAME, &v).map_err(|e| e.to_string())?;
        p.run(&input)
            .map(serde_json::Value::from)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn write_read_list_hash_move_delete() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let p = plugin(dir.path(), "");
        run(
            &p,
            json!({"op": "write", "path": "sub/a.txt", "content": "hello"}),
        )
        .unwrap();
        run(
            &p,
            json!({"op": "write", "path": "sub/a.txt", "content": "!", "append": true}),
        )
        .unwrap();
        let r = run(&p, json!({"op": "read", "path": "sub/a.txt"})).unwrap();
        assert_eq!(r["content"], "hello!");
        assert_eq!(r["size"], 6);
        let r = run(
            &p,
            json!({"op": "read", "path": "sub/a.txt", "encoding": "base64"}),
        )
        .unwrap();
        assert_eq!(r["content"], base64_encode(b"hello!"));
        let r = run(&p, json!({"op": "hash", "path": "sub/a.txt"})).unwrap();
        assert_eq!(
            r["sha256"],
            "ce06092fb948d9ffac7d1a376e404b26b7575bcc11ee05a4615fef4fec3a308b"
        );
        let r = run(&p, json!({"op": "list", "path": "sub"})).unwrap();
        assert_eq!(r["entries"][0]["name"], "a.txt");
        assert_eq!(r["entries"][0]["type"], "file");
        run(
            &p,
            json!({"op": "move", "from": "sub/a.txt", "to": "b.txt"}),
        )
        .unwrap();
        assert!(dir.path().join("b.txt").exists());
        run(
            &p,
            json!({"op": "write", "path": "c.txt", "content_base64": "AAEC"}),
        )
        .unwrap();
        assert_eq!(std::fs::read(dir.path().join("c.txt")).unwrap(), [0, 1, 2]);
        let e = run(&p, json!({"op": "move", "from": "c.txt", "to": "b.txt"})).unwrap_err();
        assert!(e.contains("`to`") && e.contains("overwrite"), "{e}");
        run(&p, json!({"op": "delete", "path": "b.txt"})).unwrap();
        run(&p, json!({"op": "delete", "path": "sub"})).unwrap();
        assert!(!dir.path().join("sub").exists());
        let r = run(&p, json!({"op": "list"})).unwrap();
        assert_eq!(r["entries"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn hostile_paths_and_limits_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "s").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("outdir")).unwrap();
        std::fs::write(dir.path().join("big"), vec![b'x'; 100]).unwrap();
        let p = plugin(dir.path(), "max_read_bytes = 10\nmax_write_bytes = 10");
        for (input, field) in [
            (json!({"op": "read", "path": "../x"}), "`path`"),
            (json!({"op": "read", "path": "/etc/passwd"}), "`path`"),
            (json!({"op": "read", "path": "link"}), "`path`"),
            (json!({"op": "hash", "path": "link"}), "`path`"),
            (json!({"op": "list", "path": "outdir"}), "`path`"),
            (
                json!({"op": "write", "path": "outdir/new", "content": "x"}),
                "`path`",
            ),
            (
                json!({"op": "write", "path": "link", "content": "x"}),
                "`path`",
            ),
            (
                json!({"op": "move", "from": "big", "to": "outdir/big"}),
                "`to`",
            ),
            (json!({"op": "move", "from": "link", "to": "l2"}), "`from`"),
            (json!({"op": "delete", "path": "link"}), "`path`"),
            (json!({"op": "delete", "path": "."}), "`path`"),
            (json!({"op": "read", "path": "big"}), "max_read_bytes"),
            (
                json!({"op": "write", "path": "w", "content": "0123456789a"}),
                "max_write_bytes",
            ),
            (json!({"op": "read"}), "`path`"),
            (json!({"op": "frob", "path": "big"}), "`op`"),
            (json!({"path": "big"}), "`op`"),
            (json!({"op": "write", "path": "w"}), "`content`"),
            (json!({"op": "read", "path": "nope"}), "nope"),
        ] {
            let e = run(&p, input.clone()).unwrap_err();
            assert!(e.contains("`file`") && e.contains(field), "{input}: {e}");
        }
        assert_eq!(std::fs::read(outside.path().join("secret")).unwrap(), b"s");
        assert!(!outside.path().join("new").exists());
        let t: toml::Table = toml::from_str("root = \"/no/such/dir\"").unwrap();
        assert!(FilePlugin::from_config(&t)
            .unwrap_err()
            .to_string()
            .contains("root"));
    }
}
