//! XML → JSON, for `transform: { response: { xml_to_json: true } }`.
//!
//! # The mapping
//!
//! | XML | JSON |
//! |---|---|
//! | the document | an object with one key, the root element's name: `{"order": …}` |
//! | an element with attributes or child elements | an object |
//! | an attribute `id="7"` | `"@id": "7"` |
//! | an element with only text, `<a>x</a>` | the string `"x"` |
//! | text of an element with attributes or children | `"#text": "…"` |
//! | an empty element, `<a/>` or `<a></a>` | `null` |
//! | an element with only attributes, `<a x="1"/>` | `{"@x": "1"}` |
//! | sibling elements of the same name | an array, in document order (also when other elements stand between them) |
//! | a prefixed name, `<soap:Body>`, `xsi:type="…"` | the name as written: `"soap:Body"`, `"@xsi:type"` |
//! | namespace declarations, `xmlns` and `xmlns:p` | dropped (the prefixes stay as written) |
//! | `<![CDATA[…]]>` | text, as is |
//! | `&lt;` `&gt;` `&amp;` `&apos;` `&quot;`, `&#65;` `&#x41;` | decoded |
//! | any other entity (`&nbsp;`, anything a DOCTYPE declares) | an error: nothing is expanded |
//! | whitespace-only text (indentation) | ignored; write it as CDATA or `&#32;` to keep it |
//! | comments, processing instructions, the XML declaration, a DOCTYPE | ignored |
//! | numbers, booleans | strings: XML has no types, so `<n>12.50</n>` is `"12.50"` |
//!
//! Text is kept exactly as written (after decoding) in an element without child elements. In an
//! element with child elements (mixed content), its text pieces are joined and trimmed into
//! `"#text"`: the mapping is meant for data, not for documents. Attribute values are
//! normalised as XML requires (tabs and newlines become spaces).
//!
//! An element that appears once is a single value and one that repeats is an array, so a list
//! with one item looks like a field: reshape with `json_ops` when a client needs an array.
//! Object keys come out in document order (attributes first, a repeated element where it first
//! appears, `#text` last).
//!
//! Example:
//!
//! ```xml
//! <?xml version="1.0" encoding="UTF-8"?>
//! <soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/">
//!   <soap:Body>
//!     <order id="42" status="open">
//!       <item sku="A1">Pen</item>
//!       <item sku="B2"><![CDATA[Ink & paper]]></item>
//!       <total>12.50</total>
//!       <note/>
//!       <customer>Ann &amp; Bob</customer>
//!     </order>
//!   </soap:Body>
//! </soap:Envelope>
//! ```
//!
//! ```json
//! {"soap:Envelope": {"soap:Body": {"order": {
//!   "@id": "42", "@status": "open",
//!   "item": [{"@sku": "A1", "#text": "Pen"}, {"@sku": "B2", "#text": "Ink & paper"}],
//!   "total": "12.50",
//!   "note": null,
//!   "customer": "Ann & Bob"}}}}
//! ```
//!
//! # Limits
//!
//! The input must be UTF-8 (a declaration naming another encoding is an error); elements nest
//! at most [`MAX_DEPTH`] deep; the input's size is the caller's bound (`max_body`). Malformed
//! input is an `Err`, never a panic and never a partial document. quick-xml never expands
//! entities, and we decode only the predefined ones, so a "billion laughs" document is an error
//! at its first custom reference, using no more memory than its own size.

use quick_xml::escape::resolve_predefined_entity;
use quick_xml::events::{BytesStart, Event};
use quick_xml::{Reader, XmlVersion};
use serde_json::{Map, Value};

/// How deep elements may nest. Real APIs stay far below; deeper input is hostile or broken.
pub const MAX_DEPTH: usize = 64;

/// Why an XML body could not be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    #[error("the body is not UTF-8")]
    NotUtf8,
    #[error("unsupported encoding '{0}' (only UTF-8)")]
    Encoding(String),
    #[error("elements nest deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("undefined entity '&{0};' (only the five XML entities and character references are decoded)")]
    UndefinedEntity(String),
    #[error("no root element")]
    NoRoot,
    #[error("more than one root element")]
    SeveralRoots,
    #[error("text outside the root element")]
    TextOutsideRoot,
    #[error("malformed XML at byte {position}: {message}")]
    Malformed { position: u64, message: String },
}

/// Convert an XML document to JSON (the mapping is in the module's documentation).
pub fn to_json(input: &[u8]) -> Result<Value, XmlError> {
    let text = std::str::from_utf8(input).map_err(|_| XmlError::NotUtf8)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut reader = Reader::from_str(text);
    {
        let cfg = reader.config_mut();
        cfg.check_end_names = true;
        cfg.check_comments = true;
        cfg.allow_unmatched_ends = false;
        cfg.expand_empty_elements = false;
        cfg.trim_text_start = false;
        cfg.trim_text_end = false;
    }
    let mut doc = Doc::default();
    loop {
        let event = reader.read_event().map_err(|e| malformed(&reader, e))?;
        match event {
            Event::Start(e) => {
                let frame = Frame::open(&e, &reader)?;
                doc.push(frame)?;
            }
            Event::Empty(e) => {
                let frame = Frame::open(&e, &reader)?;
                doc.push(frame)?;
                doc.pop(&reader)?;
            }
            // quick-xml checks that the name matches the open element.
            Event::End(_) => doc.pop(&reader)?,
            Event::Text(t) => {
                let s = t.xml10_content().map_err(|e| malformed(&reader, e))?;
                doc.text(&s, false)?;
            }
            Event::CData(c) => {
                let s = c.xml10_content().map_err(|e| malformed(&reader, e))?;
                doc.text(&s, true)?;
            }
            Event::GeneralRef(r) => {
                if let Some(c) = r.resolve_char_ref().map_err(|e| malformed(&reader, e))? {
                    doc.text(c.encode_utf8(&mut [0; 4]), true)?;
                } else {
                    let name = r.decode().map_err(|e| malformed(&reader, e))?;
                    // Only the predefined five: a DOCTYPE's declarations are never expanded.
                    match resolve_predefined_entity(&name) {
                        Some(s) => doc.text(s, true)?,
                        None => return Err(XmlError::UndefinedEntity(name.into_owned())),
                    }
                }
            }
            Event::Decl(d) => {
                if let Some(enc) = d.encoding() {
                    let enc = enc.map_err(|e| malformed(&reader, e))?;
                    let enc = String::from_utf8_lossy(&enc).to_ascii_lowercase();
                    if !matches!(enc.as_str(), "utf-8" | "utf8" | "us-ascii" | "ascii") {
                        return Err(XmlError::Encoding(enc));
                    }
                }
            }
            Event::Comment(_) | Event::PI(_) | Event::DocType(_) => {}
            Event::Eof => break,
        }
    }
    doc.finish(text.len() as u64)
}

fn malformed(reader: &Reader<&[u8]>, e: impl std::fmt::Display) -> XmlError {
    XmlError::Malformed {
        position: reader.error_position().max(reader.buffer_position()),
        message: e.to_string(),
    }
}

/// XML's own whitespace (indentation between elements).
fn is_xml_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// The open elements, and the root once it is closed.
#[derive(Default)]
struct Doc {
    open: Vec<Frame>,
    root: Option<(String, Value)>,
}

impl Doc {
    fn push(&mut self, frame: Frame) -> Result<(), XmlError> {
        if self.open.is_empty() && self.root.is_some() {
            return Err(XmlError::SeveralRoots);
        }
        if self.open.len() >= MAX_DEPTH {
            return Err(XmlError::TooDeep);
        }
        self.open.push(frame);
        Ok(())
    }

    fn pop(&mut self, reader: &Reader<&[u8]>) -> Result<(), XmlError> {
        let Some(frame) = self.open.pop() else {
            return Err(malformed(reader, "closing tag without an open element"));
        };
        let (name, value) = frame.close();
        match self.open.last_mut() {
            Some(parent) => parent.child(name, value),
            None => self.root = Some((name, value)),
        }
        Ok(())
    }

    /// Text, a CDATA section or a decoded reference (`explicit`: kept even if whitespace).
    fn text(&mut self, s: &str, explicit: bool) -> Result<(), XmlError> {
        match self.open.last_mut() {
            Some(f) => {
                f.text.push_str(s);
                f.significant |= explicit || !s.chars().all(is_xml_space);
                Ok(())
            }
            None if !explicit && s.chars().all(is_xml_space) => Ok(()),
            None => Err(XmlError::TextOutsideRoot),
        }
    }

    /// At the end of the input (`end`: its length).
    fn finish(self, end: u64) -> Result<Value, XmlError> {
        if let Some(f) = self.open.last() {
            return Err(XmlError::Malformed {
                position: end,
                message: format!("element <{}> is not closed", f.name),
            });
        }
        let (name, value) = self.root.ok_or(XmlError::NoRoot)?;
        let mut m = Map::new();
        m.insert(name, value);
        Ok(Value::Object(m))
    }
}

/// One open element.
struct Frame {
    name: String,
    /// Attributes and child elements.
    fields: Map<String, Value>,
    has_children: bool,
    text: String,
    /// The text holds more than indentation.
    significant: bool,
}

impl Frame {
    fn open(e: &BytesStart, reader: &Reader<&[u8]>) -> Result<Frame, XmlError> {
        let name = utf8(e.name().as_ref())?.to_string();
        let mut fields = Map::new();
        for attr in e.attributes() {
            let attr = attr.map_err(|err| malformed(reader, err))?;
            let key = utf8(attr.key.as_ref())?;
            // Declarations are plumbing: the prefixes they bind are kept as written.
            if key == "xmlns" || key.starts_with("xmlns:") {
                continue;
            }
            let value = attr
                .normalized_value_with(XmlVersion::Implicit1_0, 1, resolve_predefined_entity)
                .map_err(|err| malformed(reader, err))?;
            fields.insert(format!("@{key}"), Value::String(value.into_owned()));
        }
        Ok(Frame {
            name,
            fields,
            has_children: false,
            text: String::new(),
            significant: false,
        })
    }

    fn child(&mut self, name: String, value: Value) {
        self.has_children = true;
        // An element's own value is never an array, so an array here always means repetition.
        match self.fields.get_mut(&name) {
            Some(Value::Array(items)) => items.push(value),
            Some(first) => {
                let first = first.take();
                self.fields.insert(name, Value::Array(vec![first, value]));
            }
            None => {
                self.fields.insert(name, value);
            }
        }
    }

    fn close(self) -> (String, Value) {
        let Frame {
            name,
            mut fields,
            has_children,
            text,
            significant,
        } = self;
        if fields.is_empty() {
            let v = if significant { Value::String(text) } else { Value::Null };
            return (name, v);
        }
        if significant {
            let t = if has_children {
                text.trim_matches(is_xml_space).to_string()
            } else {
                text
            };
            if !t.is_empty() {
                fields.insert("#text".into(), Value::String(t));
            }
        }
        (name, Value::Object(fields))
    }
}

fn utf8(b: &[u8]) -> Result<&str, XmlError> {
    std::str::from_utf8(b).map_err(|_| XmlError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conv(s: &str) -> Value {
        match to_json(s.as_bytes()) {
            Ok(v) => v,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    #[test]
    fn mapping_table() {
        let cases: &[(&str, Value)] = &[
            ("<a>x</a>", json!({"a": "x"})),
            ("<a/>", json!({"a": null})),
            ("<a></a>", json!({"a": null})),
            ("<a>\n  \n</a>", json!({"a": null})),
            ("<a x=\"1\"/>", json!({"a": {"@x": "1"}})),
            ("<a x=\"1\">t</a>", json!({"a": {"@x": "1", "#text": "t"}})),
            ("<a><b>1</b><c>2</c></a>", json!({"a": {"b": "1", "c": "2"}})),
            ("<a><b>1</b><b>2</b></a>", json!({"a": {"b": ["1", "2"]}})),
            (
                "<a><b>1</b><c/><b>2</b><b/></a>",
                json!({"a": {"b": ["1", "2", null], "c": null}}),
            ),
            ("<a><b><c>1</c></b><b>x</b></a>", json!({"a": {"b": [{"c": "1"}, "x"]}})),
            ("<a>  keep  </a>", json!({"a": "  keep  "})),
            (
                "<a>\n  hello <b>x</b> world\n</a>",
                json!({"a": {"#text": "hello  world", "b": "x"}}),
            ),
            ("<a><![CDATA[<b>&amp;</b>]]></a>", json!({"a": "<b>&amp;</b>"})),
            ("<a><![CDATA[ ]]></a>", json!({"a": " "})),
            ("<a>&#32;</a>", json!({"a": " "})),
            (
                "<a>1 &lt; 2 &amp;&amp; &quot;q&quot; &apos;s&apos; &gt;</a>",
                json!({"a": "1 < 2 && \"q\" 's' >"}),
            ),
            ("<a>&#65;&#x42;&#x1F600;</a>", json!({"a": "AB😀"})),
            ("<a t=\"&lt;&#65;&quot;\"/>", json!({"a": {"@t": "<A\""}})),
            ("<a t=\"x\ny\"/>", json!({"a": {"@t": "x y"}})),
            ("<n>12.50</n>", json!({"n": "12.50"})),
            ("<b>true</b>", json!({"b": "true"})),
            (
                "<s:E xmlns:s=\"urn:s\" xmlns=\"urn:d\" xsi:type=\"t\"><s:B>1</s:B></s:E>",
                json!({"s:E": {"@xsi:type": "t", "s:B": "1"}}),
            ),
            ("<a xmlns=\"urn:x\">t</a>", json!({"a": "t"})),
            (
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!-- c --><a><?pi x?>t<!-- c --></a>\n",
                json!({"a": "t"}),
            ),
            ("\u{feff}<a>bom</a>", json!({"a": "bom"})),
            ("<!DOCTYPE a><a>d</a>", json!({"a": "d"})),
            ("<a>l1\r\nl2</a>", json!({"a": "l1\nl2"})),
            ("<a>é 日本</a>", json!({"a": "é 日本"})),
        ];
        for (xml, want) in cases {
            assert_eq!(&conv(xml), want, "{xml}");
        }
    }

    #[test]
    fn module_example() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/">
  <soap:Body>
    <order id="42" status="open">
      <item sku="A1">Pen</item>
      <item sku="B2"><![CDATA[Ink & paper]]></item>
      <total>12.50</total>
      <note/>
      <customer>Ann &amp; Bob</customer>
    </order>
  </soap:Body>
</soap:Envelope>"#;
        let want = json!({"soap:Envelope": {"soap:Body": {"order": {
          "@id": "42", "@status": "open",
          "customer": "Ann & Bob",
          "item": [{"@sku": "A1", "#text": "Pen"}, {"@sku": "B2", "#text": "Ink & paper"}],
          "note": null,
          "total": "12.50"}}}});
        assert_eq!(conv(xml), want);
    }

    #[test]
    fn errors_table() {
        type IsExpected = fn(&XmlError) -> bool;
        let cases: &[(&[u8], IsExpected)] = &[
            (b"", |e| *e == XmlError::NoRoot),
            (b"  \n ", |e| *e == XmlError::NoRoot),
            (b"<!-- only -->", |e| *e == XmlError::NoRoot),
            (b"<a/><b/>", |e| *e == XmlError::SeveralRoots),
            (b"<a></a><a></a>", |e| *e == XmlError::SeveralRoots),
            (b"x<a/>", |e| *e == XmlError::TextOutsideRoot),
            (b"<a/>x", |e| *e == XmlError::TextOutsideRoot),
            (b"<a/>&amp;", |e| *e == XmlError::TextOutsideRoot),
            (b"<a>", |e| matches!(e, XmlError::Malformed { .. })),
            (b"<a><b></a>", |e| matches!(e, XmlError::Malformed { .. })),
            (b"<a></b>", |e| matches!(e, XmlError::Malformed { .. })),
            (b"</a>", |e| matches!(e, XmlError::Malformed { .. })),
            (b"<a x=1/>", |e| matches!(e, XmlError::Malformed { .. })),
            (b"<a x=\"1\" x=\"2\"/>", |e| matches!(e, XmlError::Malformed { .. })),
            (b"<a>&</a>", |e| matches!(e, XmlError::Malformed { .. })),
            (b"<a>&amp</a>", |e| matches!(e, XmlError::Malformed { .. })),
            (b"<a>&#0;</a>", |e| matches!(e, XmlError::Malformed { .. })),
            (b"<a>&#xD800;</a>", |e| matches!(e, XmlError::Malformed { .. })),
            (b"<a>&nbsp;</a>", |e| *e == XmlError::UndefinedEntity("nbsp".into())),
            (b"<a x=\"&nbsp;\"/>", |e| matches!(e, XmlError::Malformed { .. })),
            (b"<a><!-- a -- b --></a>", |e| matches!(e, XmlError::Malformed { .. })),
            (b"<a>\xff</a>", |e| *e == XmlError::NotUtf8),
            (b"<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?><a/>", |e| {
                *e == XmlError::Encoding("iso-8859-1".into())
            }),
            (b"{\"json\": true}", |e| *e == XmlError::TextOutsideRoot),
        ];
        for (xml, ok) in cases {
            let r = to_json(xml);
            match &r {
                Err(e) if ok(e) => {}
                other => panic!("{}: unexpected {other:?}", String::from_utf8_lossy(xml)),
            }
        }
    }

    #[test]
    fn depth_is_bounded() {
        let ok = format!("{}{}", "<a>".repeat(MAX_DEPTH), "</a>".repeat(MAX_DEPTH));
        assert!(to_json(ok.as_bytes()).is_ok());
        let deep = format!("{}{}", "<a>".repeat(MAX_DEPTH + 1), "</a>".repeat(MAX_DEPTH + 1));
        assert_eq!(to_json(deep.as_bytes()), Err(XmlError::TooDeep));
        let deep_empty = format!("{}<b/>{}", "<a>".repeat(MAX_DEPTH), "</a>".repeat(MAX_DEPTH));
        assert_eq!(to_json(deep_empty.as_bytes()), Err(XmlError::TooDeep));
        // Hostile: a million opening tags fails fast instead of recursing or allocating.
        let hostile = "<a>".repeat(1_000_000);
        assert_eq!(to_json(hostile.as_bytes()), Err(XmlError::TooDeep));
    }

    #[test]
    fn billion_laughs_is_not_expanded() {
        let mut xml = String::from("<?xml version=\"1.0\"?>\n<!DOCTYPE lolz [\n<!ENTITY lol \"lol\">\n");
        for i in 1..10 {
            let prev = if i == 1 {
                "lol".to_string()
            } else {
                format!("lol{}", i - 1)
            };
            xml.push_str(&format!("<!ENTITY lol{i} \"{}\">\n", format!("&{prev};").repeat(10)));
        }
        xml.push_str("]>\n<lolz>&lol9;</lolz>");
        assert_eq!(to_json(xml.as_bytes()), Err(XmlError::UndefinedEntity("lol9".into())));
        // The same in an attribute.
        let attr = xml.replace("<lolz>&lol9;</lolz>", "<lolz a=\"&lol9;\"/>");
        assert!(matches!(to_json(attr.as_bytes()), Err(XmlError::Malformed { .. })));
        // A DOCTYPE alone is ignored, and so is an external entity it declares but nobody uses.
        let xxe = "<!DOCTYPE a [<!ENTITY x SYSTEM \"file:///etc/passwd\">]><a>safe</a>";
        assert_eq!(conv(xxe), json!({"a": "safe"}));
        let xxe_used = "<!DOCTYPE a [<!ENTITY x SYSTEM \"file:///etc/passwd\">]><a>&x;</a>";
        assert_eq!(to_json(xxe_used.as_bytes()), Err(XmlError::UndefinedEntity("x".into())));
    }

    #[test]
    fn many_siblings_stay_linear() {
        let xml = format!("<list>{}</list>", "<i>1</i>".repeat(100_000));
        let v = conv(&xml);
        assert_eq!(v["list"]["i"].as_array().map(Vec::len), Some(100_000));
    }
}
