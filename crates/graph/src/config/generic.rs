//! A node kind without keys of its own in the configuration file: its
//! table is read as the API's options (the protobuf JSON mapping of its
//! options message, .proto field names), so a kind added to the .proto
//! and the kind table can be written in a file before it has a friendlier
//! syntax (sizes with suffixes, durations with units) in `parse.rs`.

use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::NodeSpec;
use serde_json::{Map, Value};
use toml::de::DeValue;

use crate::config::reader::{Parser, Tbl};

impl Parser<'_> {
    /// The driver of kind `kind` from its table in `node`, as the API's
    /// JSON reads it.
    pub(super) fn api_driver(&mut self, node: &mut Tbl<'_, '_>, kind: &str) -> Option<Driver> {
        let v = self.field(node, kind)?;
        let rel = node.rel(kind);
        let options = match to_json(v.get_ref()) {
            Ok(options) => options,
            Err(e) => {
                self.err_rel(v.span(), &rel, e);
                return None;
            }
        };
        let mut spec = Map::new();
        spec.insert(kind.to_string(), options);
        match serde_json::from_value::<NodeSpec>(Value::Object(spec)) {
            Ok(spec) => spec.driver,
            Err(e) => {
                self.err_rel(v.span(), &rel, format!("invalid {kind} options: {e}"));
                None
            }
        }
    }
}

/// A TOML value as JSON.
fn to_json(v: &DeValue<'_>) -> Result<Value, String> {
    Ok(match v {
        DeValue::String(s) => Value::String(s.to_string()),
        DeValue::Integer(n) => {
            let i = i128::from_str_radix(n.as_str(), n.radix())
                .map_err(|e| format!("integer {}: {e}", n.as_str()))?;
            match (u64::try_from(i), i64::try_from(i)) {
                (Ok(u), _) => Value::from(u),
                (_, Ok(s)) => Value::from(s),
                _ => return Err(format!("integer {i} is out of range")),
            }
        }
        DeValue::Float(f) => {
            let x: f64 = f
                .as_str()
                .parse()
                .map_err(|e| format!("float {}: {e}", f.as_str()))?;
            Value::from(x)
        }
        DeValue::Boolean(b) => Value::Bool(*b),
        DeValue::Datetime(d) => Value::String(d.to_string()),
        DeValue::Array(a) => Value::Array(
            a.iter()
                .map(|x| to_json(x.get_ref()))
                .collect::<Result<_, _>>()?,
        ),
        DeValue::Table(t) => Value::Object(
            t.iter()
                .map(|(k, x)| Ok((k.get_ref().to_string(), to_json(x.get_ref())?)))
                .collect::<Result<_, String>>()?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use blkmesh_proto::v1::RawOptions;
    use std::collections::BTreeMap;

    fn parser<'a>(text: &'a str) -> Parser<'a> {
        Parser {
            file: "c.toml",
            text,
            errors: Vec::new(),
            keys: BTreeMap::new(),
            obj: "node[0]".into(),
        }
    }

    /// Reads the `raw` table of `text` as the API's JSON.
    fn read(text: &str) -> (Option<Driver>, Vec<String>) {
        let doc = toml::de::DeTable::parse(text).unwrap();
        let mut p = parser(text);
        let mut t = Tbl::new(doc.get_ref(), doc.span(), "");
        let driver = p.api_driver(&mut t, "raw");
        (driver, p.errors.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn reads_a_kind_as_the_api_json() {
        let (driver, errors) = read("raw = { child = \"c\", offset = 512, size = \"1024\" }");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            driver,
            Some(Driver::Raw(RawOptions {
                child: "c".into(),
                offset: 512,
                size: 1024,
            }))
        );
    }

    #[test]
    fn bad_options_are_located() {
        let (driver, errors) = read("raw = { child = \"c\", colour = 1 }");
        assert_eq!(driver, None);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("c.toml:1:7: node[0].raw: invalid raw options: "),
            "{errors:?}"
        );
        let (_, errors) = read("raw = { child = \"c\", offset = -1 }");
        assert!(errors[0].contains("invalid raw options"), "{errors:?}");
    }
}
