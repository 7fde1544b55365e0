//! Structured output: answers kept to JSON by constrained decoding.
//!
//! A `response_format` (`json_object`, or `json_schema` with a schema)
//! compiles to a [`Grammar`]: a small graph of value kinds (objects with their
//! properties, arrays, strings, numbers, booleans, null, literal sets for
//! `enum`/`const`, unions told apart by their first byte). A [`JsonState`]
//! reads the answer byte by byte as a pushdown automaton over that graph.
//! Before each token is picked, tokens whose bytes the automaton would refuse
//! are masked out, so the answer parses and validates by construction; when
//! the token budget runs out first, the shortest text that closes every open
//! value is appended (and the finish reason says `length`).
//!
//! Properties are written in the schema's order; an optional one may be left
//! out. Whitespace between tokens is allowed in short runs (a model may
//! pretty-print) but not without end.

use serde_json::Value;
use std::collections::HashMap;

/// A schema compiled for decoding.
#[derive(Debug)]
pub struct Grammar {
    nodes: Vec<Node>,
    /// Literal sets: each a list of candidate texts (JSON, compact).
    literals: Vec<Vec<Vec<u8>>>,
    /// The length in bytes of each node's shortest value (saturating): the
    /// text itself is written only when needed, piece by piece
    /// ([`JsonState::completion`]), so it costs memory only as it is written.
    shortest: Vec<u64>,
    root: Id,
}

type Id = u16;

/// Limits on a schema, each refused up front with the path and the limit.
/// Together they bound compile time and memory linearly in the schema's
/// size, and keep every recursion of the compiler shallow.
pub mod limits {
    /// Bytes of the schema, as compact JSON.
    pub const SCHEMA_BYTES: usize = 64 * 1024;
    /// Parts a schema compiles to.
    pub const NODES: usize = 4096;
    /// Parts nested inside parts, `$ref` hops included.
    pub const DEPTH: usize = 32;
    /// `$ref` hops along one path.
    pub const REF_HOPS: usize = 16;
    /// Values of an `enum`, properties of an object.
    pub const LITERALS: usize = 64;
    /// Alternatives of an `anyOf` or a `type` list.
    pub const ALTERNATIVES: usize = 16;
    /// Bytes of one `const`, `enum` value or property name (as JSON).
    pub const LITERAL_BYTES: usize = 4096;
}
use limits::{LITERALS as MAX_LITERALS, NODES as MAX_NODES};
/// Most frames (values) open at once while an answer is read.
const MAX_DEPTH: usize = 48;
/// Bytes a closing text may reach before it is cut (never reached by a
/// schema admitted for its `max_tokens`: see `fits`).
const MAX_COMPLETION: usize = 16 << 20;
/// Longest run of whitespace between tokens of the JSON text.
const MAX_WS_RUN: u8 = 24;
/// Most digits of a number's integer and fraction parts (an integer then
/// fits an i64), and of its exponent (a number then fits an f64).
const MAX_DIGITS: u8 = 18;
const MAX_EXP_DIGITS: u8 = 2;

#[derive(Debug, Clone)]
enum Node {
    /// An object with fixed properties (written in this order), or, with
    /// `free`, any keys whose values are `free`'s node.
    Object {
        props: Vec<Prop>,
        keys: u16,
        free: Option<Id>,
    },
    Array {
        items: Id,
        min: u32,
        max: u32,
    },
    String {
        max_chars: u32,
    },
    Number {
        integer: bool,
    },
    /// One of a literal set's texts (`true`/`false`, `null`, enum, const).
    Literal(u16),
    /// One of several nodes, told apart by the value's first byte.
    Union(Vec<Id>),
}

#[derive(Debug, Clone)]
struct Prop {
    node: Id,
    required: bool,
}

/// The keywords that change what is accepted, and those read and ignored (annotations).
const KEPT: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "enum",
    "const",
    "anyOf",
    "maxLength",
    "$ref",
];
const ANNOTATIONS: &[&str] =
    &["$defs", "definitions", "title", "description", "default", "examples", "$schema", "$id", "$comment"];

/// A reason a schema is refused, with the path of the part it is about.
fn refuse(path: &str, why: impl std::fmt::Display) -> String {
    format!("{}: {why}", if path.is_empty() { "schema" } else { path })
}

struct Compiler<'a> {
    root: &'a Value,
    g: Grammar,
    /// `$ref`s compiled (or being compiled: `None`).
    refs: HashMap<String, Option<Id>>,
    any: Option<Id>,
}

/// Where the compiler stands in the schema: the path (for errors), how deep
/// it is and how many `$ref` hops led there.
#[derive(Clone, Copy)]
struct At<'p> {
    path: &'p str,
    depth: usize,
    hops: usize,
}

impl At<'_> {
    /// One level further down, at `path`.
    fn down(self, path: &str) -> At<'_> {
        At { path, depth: self.depth + 1, hops: self.hops }
    }
}

impl Grammar {
    /// Whether a value of `id` can begin with `b`.
    fn starts(&self, id: Id, b: u8) -> bool {
        match &self.nodes[id as usize] {
            Node::Object { .. } => b == b'{',
            Node::Array { .. } => b == b'[',
            Node::String { .. } => b == b'"',
            Node::Number { .. } => b == b'-' || b.is_ascii_digit(),
            Node::Literal(set) => self.literals[*set as usize].iter().any(|t| t[0] == b),
            // Unions are flat (an alternative is never a union): one level only.
            Node::Union(alts) => {
                alts.iter().any(|&alt| !matches!(self.nodes[alt as usize], Node::Union(_)) && self.starts(alt, b))
            }
        }
    }

    /// Refuses a grammar whose values can need more closing text than
    /// `max_tokens` tokens of at most `longest_token` bytes each can hold:
    /// an answer cut by its budget is closed with that text, so admitting it
    /// would let a few schema bytes demand an answer of any size.
    pub fn fits(&self, max_tokens: usize, longest_token: usize) -> Result<(), String> {
        let need = self.longest_shortest();
        let tokens = need.div_ceil(longest_token.max(1) as u64);
        if tokens > max_tokens as u64 {
            return Err(format!(
                "response_format json_schema: the shortest value of a part of this schema is {need} bytes, at least {tokens} tokens of this model; max_tokens is {max_tokens}"
            ));
        }
        Ok(())
    }

    /// The first piece of the shortest value of `id`: the whole value for
    /// scalars, the opening bracket for objects and arrays (the rest follows
    /// from the state), so the closing text is written as it is needed.
    fn opening(&self, id: Id) -> Vec<u8> {
        match &self.nodes[id as usize] {
            Node::Object { .. } => b"{".to_vec(),
            Node::Array { .. } => b"[".to_vec(),
            Node::String { .. } => b"\"\"".to_vec(),
            Node::Number { .. } => b"0".to_vec(),
            Node::Literal(set) => {
                self.literals[*set as usize].iter().min_by_key(|t| t.len()).expect("non-empty").clone()
            }
            Node::Union(alts) => match alts.iter().min_by_key(|&&a| self.shortest[a as usize]) {
                Some(&alt) if !matches!(self.nodes[alt as usize], Node::Union(_)) => self.opening(alt),
                _ => b"null".to_vec(),
            },
        }
    }

    /// Bytes of the longest "shortest value" of any part: what closing the
    /// answer can need at one level, at most (the whole closing text is at
    /// most this times the open values).
    pub fn longest_shortest(&self) -> u64 {
        self.shortest.iter().copied().max().unwrap_or(0)
    }

    /// Any JSON object (`response_format` `json_object`).
    pub fn any_object() -> Grammar {
        let mut c = Compiler::new(&Value::Null);
        let any = c.any().expect("the free grammar fits");
        let root = c.push(Node::Object { props: Vec::new(), keys: 0, free: Some(any) }).expect("fits");
        c.finish(root)
    }

    /// Compiles a JSON schema; the root must be an object or an array. A
    /// keyword inferd cannot keep the answer to is refused with its path.
    pub fn from_schema(schema: &Value) -> Result<Grammar, String> {
        let bytes = serde_json::to_vec(schema).map_or(usize::MAX, |v| v.len());
        if bytes > limits::SCHEMA_BYTES {
            return Err(refuse(
                "",
                format!("the schema is {bytes} bytes; at most {} (limits::SCHEMA_BYTES)", limits::SCHEMA_BYTES),
            ));
        }
        let mut c = Compiler::new(schema);
        let root = c.compile(schema, At { path: "", depth: 0, hops: 0 })?;
        let first = c.first_bytes(root);
        if first.iter().enumerate().any(|(b, &on)| on && b != b'{' as usize && b != b'[' as usize) {
            return Err(refuse("", "the root must be an object or an array (\"type\": \"object\")"));
        }
        Ok(c.finish(root))
    }

    /// The start state.
    pub fn start(&self) -> JsonState {
        JsonState { frames: vec![Frame::Value(self.root)], ws: 0 }
    }
}

impl<'a> Compiler<'a> {
    fn new(root: &'a Value) -> Self {
        Compiler {
            root,
            g: Grammar { nodes: Vec::new(), literals: Vec::new(), shortest: Vec::new(), root: 0 },
            refs: HashMap::new(),
            any: None,
        }
    }

    fn push(&mut self, node: Node) -> Result<Id, String> {
        if self.g.nodes.len() >= MAX_NODES {
            return Err(refuse("", format!("the schema is too large (over {MAX_NODES} parts)")));
        }
        self.g.nodes.push(node);
        Ok((self.g.nodes.len() - 1) as Id)
    }

    fn literal(&mut self, texts: Vec<Vec<u8>>, path: &str) -> Result<Id, String> {
        Self::literal_sizes(&texts, path)?;
        self.g.literals.push(texts);
        self.push(Node::Literal((self.g.literals.len() - 1) as u16))
    }

    /// Refuses a literal text over the limit (a literal frame counts its bytes in a u16).
    fn literal_sizes(texts: &[Vec<u8>], path: &str) -> Result<(), String> {
        match texts.iter().map(Vec::len).max() {
            Some(n) if n > limits::LITERAL_BYTES => Err(refuse(
                path,
                format!("a const, enum value or property name of {n} bytes; at most {}", limits::LITERAL_BYTES),
            )),
            _ => Ok(()),
        }
    }

    /// Any JSON value (objects and arrays nest, up to the depth limit).
    fn any(&mut self) -> Result<Id, String> {
        if let Some(id) = self.any {
            return Ok(id);
        }
        let union = self.push(Node::Union(Vec::new()))?;
        self.any = Some(union);
        let alts = vec![
            self.literal(vec![b"null".to_vec()], "")?,
            self.literal(vec![b"false".to_vec(), b"true".to_vec()], "")?,
            self.push(Node::Number { integer: false })?,
            self.push(Node::String { max_chars: u32::MAX })?,
            self.push(Node::Array { items: union, min: 0, max: u32::MAX })?,
            self.push(Node::Object { props: Vec::new(), keys: 0, free: Some(union) })?,
        ];
        self.g.nodes[union as usize] = Node::Union(alts);
        Ok(union)
    }

    fn compile(&mut self, s: &Value, at: At<'_>) -> Result<Id, String> {
        let path = at.path;
        if at.depth > limits::DEPTH {
            return Err(refuse(
                path,
                format!(
                    "parts nested over {} deep ($ref hops included); at most {} (limits::DEPTH)",
                    limits::DEPTH,
                    limits::DEPTH
                ),
            ));
        }
        let obj = match s {
            Value::Bool(true) => return self.any(),
            Value::Object(o) => o,
            _ => return Err(refuse(path, "a schema must be an object")),
        };
        for key in obj.keys() {
            if !KEPT.contains(&key.as_str()) && !ANNOTATIONS.contains(&key.as_str()) {
                return Err(refuse(
                    path,
                    format!(
                        "'{key}' is not supported: inferd keeps answers to {} (annotations such as title and description are ignored)",
                        KEPT.join(", ")
                    ),
                ));
            }
        }
        if let Some(r) = obj.get("$ref") {
            return self.reference(r, at);
        }
        if let Some(c) = obj.get("const") {
            return self.literal(vec![serde_json::to_vec(c).expect("a JSON value")], path);
        }
        if let Some(e) = obj.get("enum") {
            let values = e
                .as_array()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| refuse(path, "'enum' must be a non-empty list"))?;
            if values.len() > MAX_LITERALS {
                return Err(refuse(path, format!("'enum' has {} values; at most {MAX_LITERALS}", values.len())));
            }
            let mut texts: Vec<Vec<u8>> = values.iter().map(|v| serde_json::to_vec(v).expect("a JSON value")).collect();
            texts.dedup();
            return self.literal(texts, path);
        }
        if let Some(any_of) = obj.get("anyOf") {
            let alts = any_of
                .as_array()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| refuse(path, "'anyOf' must be a non-empty list"))?;
            if alts.len() > limits::ALTERNATIVES {
                return Err(refuse(
                    path,
                    format!("'anyOf' has {} alternatives; at most {}", alts.len(), limits::ALTERNATIVES),
                ));
            }
            let mut ids = Vec::new();
            for (i, alt) in alts.iter().enumerate() {
                ids.push(self.compile(alt, at.down(&format!("{path}.anyOf[{i}]")))?);
            }
            return self.union(ids, path);
        }
        let types: Vec<&str> = match obj.get("type") {
            None if obj.contains_key("properties") => vec!["object"],
            None if obj.contains_key("items") => vec!["array"],
            None => return self.any(),
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) if !ts.is_empty() => ts
                .iter()
                .map(|t| t.as_str().ok_or_else(|| refuse(path, "'type' must name types")))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(refuse(path, "'type' must be a type name or a list of them")),
        };
        if types.len() > limits::ALTERNATIVES {
            return Err(refuse(path, format!("'type' lists {} types; at most {}", types.len(), limits::ALTERNATIVES)));
        }
        let mut ids = Vec::new();
        for t in types {
            ids.push(self.typed(t, obj, at)?);
        }
        if ids.len() == 1 { Ok(ids[0]) } else { self.union(ids, path) }
    }

    fn typed(&mut self, t: &str, obj: &serde_json::Map<String, Value>, at: At<'_>) -> Result<Id, String> {
        let path = at.path;
        let count = |key: &str| -> Result<Option<u32>, String> {
            match obj.get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| refuse(path, format!("'{key}' must be a whole number"))),
            }
        };
        match t {
            "string" => Ok(self.push(Node::String { max_chars: count("maxLength")?.unwrap_or(u32::MAX) })?),
            "number" => self.push(Node::Number { integer: false }),
            "integer" => self.push(Node::Number { integer: true }),
            "boolean" => self.literal(vec![b"false".to_vec(), b"true".to_vec()], path),
            "null" => self.literal(vec![b"null".to_vec()], path),
            "array" => {
                let items = match obj.get("items") {
                    None => self.any()?,
                    Some(i) => self.compile(i, at.down(&format!("{path}.items")))?,
                };
                let (min, max) = (count("minItems")?.unwrap_or(0), count("maxItems")?.unwrap_or(u32::MAX));
                if min > max {
                    return Err(refuse(path, "minItems is over maxItems"));
                }
                if min > 64 {
                    return Err(refuse(path, "minItems over 64 is not supported"));
                }
                self.push(Node::Array { items, min, max })
            }
            "object" => self.object(obj, at),
            other => Err(refuse(path, format!("unknown type '{other}'"))),
        }
    }

    fn object(&mut self, obj: &serde_json::Map<String, Value>, at: At<'_>) -> Result<Id, String> {
        let path = at.path;
        let empty = serde_json::Map::new();
        let props = match obj.get("properties") {
            None => &empty,
            Some(Value::Object(p)) => p,
            Some(_) => return Err(refuse(path, "'properties' must be an object")),
        };
        let required: Vec<&str> = match obj.get("required") {
            None => Vec::new(),
            Some(Value::Array(r)) => r
                .iter()
                .map(|k| k.as_str().ok_or_else(|| refuse(path, "'required' must list names")))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(refuse(path, "'required' must be a list")),
        };
        for r in &required {
            if !props.contains_key(*r) {
                return Err(refuse(path, format!("required '{r}' is not among the properties")));
            }
        }
        if props.is_empty() {
            let free = match obj.get("additionalProperties") {
                None | Some(Value::Bool(true)) => self.any()?,
                Some(Value::Bool(false)) => return self.push(Node::Object { props: Vec::new(), keys: 0, free: None }),
                Some(s) => self.compile(s, at.down(&format!("{path}.additionalProperties")))?,
            };
            return self.push(Node::Object { props: Vec::new(), keys: 0, free: Some(free) });
        }
        if props.len() > MAX_LITERALS {
            return Err(refuse(path, format!("{} properties; at most {MAX_LITERALS}", props.len())));
        }
        let mut list = Vec::new();
        let mut keys = Vec::new();
        for (name, schema) in props {
            let key = serde_json::to_vec(name).expect("a string");
            Self::literal_sizes(std::slice::from_ref(&key), path)?;
            let node = self.compile(schema, at.down(&format!("{path}.properties.{name}")))?;
            list.push(Prop { node, required: required.contains(&name.as_str()) });
            keys.push(key);
        }
        self.g.literals.push(keys);
        let keys = (self.g.literals.len() - 1) as u16;
        self.push(Node::Object { props: list, keys, free: None })
    }

    fn reference(&mut self, r: &Value, at: At<'_>) -> Result<Id, String> {
        let path = at.path;
        let r = r.as_str().ok_or_else(|| refuse(path, "'$ref' must be a string"))?;
        match self.refs.get(r) {
            Some(Some(id)) => return Ok(*id),
            Some(None) => {
                return Err(refuse(path, format!("'$ref' {r} refers to itself; recursive schemas are not supported")));
            }
            None => {}
        }
        let target = r
            .strip_prefix('#')
            .and_then(|pointer| self.root.pointer(pointer))
            .ok_or_else(|| refuse(path, format!("'$ref' {r} does not name a part of this schema (#/$defs/Name)")))?;
        if at.hops >= limits::REF_HOPS {
            return Err(refuse(
                path,
                format!(
                    "'$ref' {r} is hop {} of a chain; at most {} (limits::REF_HOPS)",
                    at.hops + 1,
                    limits::REF_HOPS
                ),
            ));
        }
        self.refs.insert(r.to_string(), None);
        let next = At { path: r.trim_start_matches('#'), depth: at.depth + 1, hops: at.hops + 1 };
        let id = self.compile(target, next)?;
        self.refs.insert(r.to_string(), Some(id));
        Ok(id)
    }

    /// A union of `ids`, flattened: an alternative that is itself a union
    /// gives its alternatives, so no union ever holds another (reading an
    /// answer never recurses through unions), and one alternative is itself.
    fn union(&mut self, ids: Vec<Id>, path: &str) -> Result<Id, String> {
        let ids: Vec<Id> = ids
            .into_iter()
            .flat_map(|id| match &self.g.nodes[id as usize] {
                Node::Union(alts) => alts.clone(),
                _ => vec![id],
            })
            .collect();
        if let [one] = ids[..] {
            return Ok(one);
        }
        let mut seen = [false; 256];
        for &id in &ids {
            let first = self.first_bytes(id);
            if first.iter().zip(seen.iter()).any(|(a, b)| *a && *b) {
                return Err(refuse(
                    path,
                    "the alternatives can begin alike (two objects, two arrays, two strings…); only alternatives of different kinds are supported",
                ));
            }
            seen.iter_mut().zip(first).for_each(|(s, f)| *s |= f);
        }
        self.push(Node::Union(ids))
    }

    /// The bytes a value of `id` can begin with.
    fn first_bytes(&self, id: Id) -> [bool; 256] {
        std::array::from_fn(|b| self.g.starts(id, b as u8))
    }

    fn finish(mut self, root: Id) -> Grammar {
        self.g.root = root;
        let n = self.g.nodes.len();
        let mut shortest: Vec<Option<u64>> = vec![None; n];
        // Children are compiled before their parents, except through the
        // free grammar's union (whose shortest value, `null`, needs no
        // child): a pass in order of ids settles nearly everything, and the
        // passes stop once one changes nothing.
        for _ in 0..n + 1 {
            let mut changed = false;
            for id in 0..n {
                if shortest[id].is_none() {
                    shortest[id] = self.shortest_of(id, &shortest);
                    changed |= shortest[id].is_some();
                }
            }
            if !changed {
                break;
            }
        }
        self.g.shortest = shortest.into_iter().map(|s| s.unwrap_or(4)).collect();
        self.g
    }

    /// The length of the shortest value of `id`, from its children's (`None` until they are known).
    fn shortest_of(&self, id: usize, known: &[Option<u64>]) -> Option<u64> {
        let g = &self.g;
        Some(match &g.nodes[id] {
            Node::Object { props, keys, .. } => {
                let mut len = 2u64;
                for (i, p) in props.iter().enumerate().filter(|(_, p)| p.required) {
                    let key = g.literals[*keys as usize][i].len() as u64;
                    len = len.saturating_add(key + 2).saturating_add(known[p.node as usize]?);
                }
                len - u64::from(props.iter().any(|p| p.required))
            }
            Node::Array { items, min, .. } => {
                let item = known[*items as usize]?;
                2u64.saturating_add(item.saturating_add(1).saturating_mul(u64::from(*min))) - u64::from(*min > 0)
            }
            Node::String { .. } => 2,
            Node::Number { .. } => 1,
            Node::Literal(l) => g.literals[*l as usize].iter().map(|t| t.len() as u64).min().expect("non-empty"),
            Node::Union(alts) => alts.iter().filter_map(|a| known[*a as usize]).min()?,
        })
    }
}

/// Where an object's reading stands.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ObjStep {
    /// After `{`: a key or `}`.
    Open,
    /// Reading a key (its frame is above).
    Key,
    /// After the key: `:`.
    Colon,
    /// After a value: `,` or `}`.
    AfterValue,
    /// After `,`: a key.
    Comma,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ArrStep {
    Open,
    AfterValue,
    Comma,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum NumStep {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

/// One open value.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Frame {
    /// A value of this node comes next (whitespace may come first).
    Value(Id),
    /// `next`: the first property not yet passed; `prop`: the one whose value is read.
    Object {
        node: Id,
        step: ObjStep,
        next: u16,
        prop: u16,
    },
    Array {
        node: Id,
        step: ArrStep,
        count: u32,
    },
    /// `left`: characters still allowed; `esc`: 0, or 1 after `\`, or
    /// 2..=5 for the hex digits of `\u` still to come; `cont`: UTF-8
    /// continuation bytes still to come, the next in `lo..=hi`.
    String {
        left: u32,
        esc: u8,
        cont: u8,
        lo: u8,
        hi: u8,
    },
    Number {
        integer: bool,
        step: NumStep,
        digits: u8,
    },
    /// `alive`: the set's texts that still match the `at` bytes read.
    Literal {
        set: u16,
        at: u16,
        alive: u64,
    },
}

/// Reading a JSON answer: the open values, innermost last.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonState {
    frames: Vec<Frame>,
    /// Whitespace bytes in a row just read.
    ws: u8,
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\t' | b'\r')
}

impl JsonState {
    /// True once the whole value has been read.
    pub fn is_done(&self) -> bool {
        self.frames.is_empty()
    }

    /// Reads `bytes`; false (and a state to throw away) when they cannot continue the value.
    pub fn feed(&mut self, g: &Grammar, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.byte(g, b))
    }

    /// Copies `other` into `self` without allocating (for trying tokens).
    pub fn copy_from(&mut self, other: &JsonState) {
        self.frames.clear();
        self.frames.extend_from_slice(&other.frames);
        self.ws = other.ws;
    }

    fn byte(&mut self, g: &Grammar, b: u8) -> bool {
        let Some(&top) = self.frames.last() else { return false };
        let ws = is_ws(b);
        let in_string = matches!(top, Frame::String { .. });
        if ws && !in_string && self.takes_ws(top) {
            self.ws += 1;
            return self.ws <= MAX_WS_RUN;
        }
        if !in_string {
            self.ws = 0;
        }
        let last = self.frames.len() - 1;
        match top {
            Frame::Value(id) => self.open(g, id, b),
            Frame::Object { node, step, next, .. } => {
                let Node::Object { props, keys, free } = &g.nodes[node as usize] else { return false };
                let required_left = props.iter().skip(next as usize).any(|p| p.required);
                let more_keys = if free.is_some() { true } else { (next as usize) < props.len() };
                match (step, b) {
                    (ObjStep::Open | ObjStep::AfterValue, b'}') if !required_left => {
                        self.frames.pop();
                        true
                    }
                    (ObjStep::AfterValue, b',') if more_keys => {
                        self.set_obj_step(last, ObjStep::Comma);
                        true
                    }
                    (ObjStep::Open | ObjStep::Comma, b'"') if more_keys => {
                        self.set_obj_step(last, ObjStep::Key);
                        if free.is_some() {
                            self.push(Frame::String { left: u32::MAX, esc: 0, cont: 0, lo: 0, hi: 0 })
                        } else {
                            // The keys from `next` up to and including the first required one.
                            let mut alive = 0u64;
                            for (i, p) in props.iter().enumerate().skip(next as usize) {
                                alive |= 1 << i;
                                if p.required {
                                    break;
                                }
                            }
                            self.push(Frame::Literal { set: *keys, at: 0, alive }) && self.byte(g, b)
                        }
                    }
                    (ObjStep::Colon, b':') => {
                        let value = match free {
                            Some(v) => *v,
                            None => {
                                let Frame::Object { prop, .. } = self.frames[last] else { return false };
                                props[prop as usize].node
                            }
                        };
                        self.set_obj_step(last, ObjStep::AfterValue);
                        self.push(Frame::Value(value))
                    }
                    _ => false,
                }
            }
            Frame::Array { node, step, count } => {
                let Node::Array { items, min, max } = g.nodes[node as usize] else { return false };
                match (step, b) {
                    (ArrStep::Open | ArrStep::AfterValue, b']') if count >= min => {
                        self.frames.pop();
                        true
                    }
                    (ArrStep::AfterValue, b',') if count < max => {
                        self.frames[last] = Frame::Array { node, step: ArrStep::Comma, count };
                        true
                    }
                    (ArrStep::Open, _) if max == 0 => false,
                    (ArrStep::Open | ArrStep::Comma, _) => {
                        self.frames[last] = Frame::Array { node, step: ArrStep::AfterValue, count: count + 1 };
                        self.push(Frame::Value(items)) && self.byte(g, b)
                    }
                    _ => false,
                }
            }
            Frame::String { left, esc, cont, lo, hi } => {
                let f = &mut self.frames[last];
                if cont > 0 {
                    if !(lo..=hi).contains(&b) {
                        return false;
                    }
                    *f = Frame::String { left, esc, cont: cont - 1, lo: 0x80, hi: 0xBF };
                    return true;
                }
                match esc {
                    1 => match b {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                            *f = Frame::String { left, esc: 0, cont, lo, hi };
                            true
                        }
                        b'u' => {
                            *f = Frame::String { left, esc: 5, cont, lo, hi };
                            true
                        }
                        _ => false,
                    },
                    2..=5 => {
                        // No surrogate halves (\uD800-\uDFFF): a lone one does not parse.
                        let ok = b.is_ascii_hexdigit() && !(esc == 5 && matches!(b, b'd' | b'D'));
                        *f = Frame::String { left, esc: esc - 1 - u8::from(esc == 2), cont, lo, hi };
                        ok
                    }
                    _ => {
                        let (need, lo, hi) = match b {
                            b'"' => {
                                self.frames.pop();
                                return self.child_done(g, 0);
                            }
                            0..=0x1F => return false,
                            b'\\' => (0, 0, 0),
                            0x20..=0x7F => (0, 0, 0),
                            0xC2..=0xDF => (1, 0x80, 0xBF),
                            0xE0 => (2, 0xA0, 0xBF),
                            0xED => (2, 0x80, 0x9F),
                            0xE1..=0xEF => (2, 0x80, 0xBF),
                            0xF0 => (3, 0x90, 0xBF),
                            0xF1..=0xF3 => (3, 0x80, 0xBF),
                            0xF4 => (3, 0x80, 0x8F),
                            _ => return false,
                        };
                        if left == 0 {
                            return false;
                        }
                        let left = if left == u32::MAX { left } else { left - 1 };
                        *f = Frame::String { left, esc: u8::from(b == b'\\'), cont: need, lo, hi };
                        true
                    }
                }
            }
            Frame::Number { integer, step, digits } => {
                let next = match (step, b) {
                    (NumStep::Minus, b'0') => Some(NumStep::Zero),
                    (NumStep::Minus, b'1'..=b'9') => Some(NumStep::Int),
                    (NumStep::Int, b'0'..=b'9') => Some(NumStep::Int),
                    // A dot needs a digit after it: only while one may still come.
                    (NumStep::Zero | NumStep::Int, b'.') if !integer && digits < MAX_DIGITS => Some(NumStep::Dot),
                    (NumStep::Dot | NumStep::Frac, b'0'..=b'9') => Some(NumStep::Frac),
                    (NumStep::Zero | NumStep::Int | NumStep::Frac, b'e' | b'E') if !integer => Some(NumStep::Exp),
                    (NumStep::Exp, b'+' | b'-') => Some(NumStep::ExpSign),
                    (NumStep::Exp | NumStep::ExpSign | NumStep::ExpDigits, b'0'..=b'9') => Some(NumStep::ExpDigits),
                    _ => None,
                };
                match next {
                    Some(step) => {
                        // Past the exponent's sign, the count starts again for the exponent's digits.
                        let digits =
                            if matches!(step, NumStep::Exp) { 0 } else { digits + u8::from(b.is_ascii_digit()) };
                        self.frames[last] = Frame::Number { integer, step, digits };
                        digits <= if step == NumStep::ExpDigits { MAX_EXP_DIGITS } else { MAX_DIGITS }
                    }
                    // The number ends at the first byte that cannot continue it.
                    None if matches!(step, NumStep::Zero | NumStep::Int | NumStep::Frac | NumStep::ExpDigits) => {
                        self.frames.pop();
                        self.child_done(g, 0) && self.byte(g, b)
                    }
                    None => false,
                }
            }
            Frame::Literal { set, at, alive } => {
                let texts = &g.literals[set as usize];
                let mut still = 0u64;
                let mut complete = None;
                for (i, t) in texts.iter().enumerate() {
                    if alive & (1 << i) != 0 {
                        if t.get(at as usize) == Some(&b) {
                            still |= 1 << i;
                        } else if t.len() == at as usize {
                            complete = Some(i);
                        }
                    }
                }
                if still != 0 {
                    let at = at + 1;
                    self.frames[last] = Frame::Literal { set, at, alive: still };
                    // Done at once when every text still alive ends here.
                    let ends = texts
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| still & (1 << i) != 0)
                        .all(|(_, t)| t.len() == at as usize);
                    if ends {
                        let i = still.trailing_zeros();
                        self.frames.pop();
                        return self.child_done(g, i as u16);
                    }
                    true
                } else if let Some(i) = complete {
                    self.frames.pop();
                    self.child_done(g, i as u16) && self.byte(g, b)
                } else {
                    false
                }
            }
        }
    }

    /// Whether whitespace may come before the next byte of `top`.
    fn takes_ws(&self, top: Frame) -> bool {
        match top {
            Frame::Value(_) => true,
            Frame::Object { step, .. } => step != ObjStep::Key,
            Frame::Array { .. } => true,
            // A number or a literal that could end here ends at whitespace.
            Frame::Number { .. } | Frame::Literal { .. } | Frame::String { .. } => false,
        }
    }

    fn set_obj_step(&mut self, at: usize, new: ObjStep) {
        if let Frame::Object { step, .. } = &mut self.frames[at] {
            *step = new;
        }
    }

    fn push(&mut self, f: Frame) -> bool {
        if self.frames.len() >= MAX_DEPTH {
            return false;
        }
        self.frames.push(f);
        true
    }

    /// A frame just ended (`which`: the literal text it matched): tells its parent.
    fn child_done(&mut self, g: &Grammar, which: u16) -> bool {
        if let Some(Frame::Object { node, step: step @ ObjStep::Key, next, prop }) = self.frames.last_mut() {
            *step = ObjStep::Colon;
            if matches!(g.nodes[*node as usize], Node::Object { free: None, .. }) {
                *prop = which;
                *next = which + 1;
            }
        }
        true
    }

    /// Opens a value of `id` with its first byte `b`.
    fn open(&mut self, g: &Grammar, id: Id, b: u8) -> bool {
        let last = self.frames.len() - 1;
        match &g.nodes[id as usize] {
            Node::Object { .. } if b == b'{' => {
                self.frames[last] = Frame::Object { node: id, step: ObjStep::Open, next: 0, prop: 0 };
                true
            }
            Node::Array { .. } if b == b'[' => {
                self.frames[last] = Frame::Array { node: id, step: ArrStep::Open, count: 0 };
                true
            }
            Node::String { max_chars } if b == b'"' => {
                self.frames[last] = Frame::String { left: *max_chars, esc: 0, cont: 0, lo: 0, hi: 0 };
                true
            }
            Node::Number { integer } if b == b'-' || b.is_ascii_digit() => {
                self.frames[last] = Frame::Number { integer: *integer, step: NumStep::Minus, digits: 0 };
                b == b'-' || self.byte(g, b)
            }
            Node::Literal(set) => {
                let n = g.literals[*set as usize].len();
                let alive = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
                self.frames[last] = Frame::Literal { set: *set, at: 0, alive };
                self.byte(g, b)
            }
            // The alternatives begin differently (checked when compiled): the first byte picks one.
            Node::Union(alts) => match alts.iter().find(|&&alt| g.starts(alt, b)) {
                Some(&alt) => {
                    self.frames[last] = Frame::Value(alt);
                    self.open(g, alt, b)
                }
                None => false,
            },
            _ => false,
        }
    }

    /// The shortest text that closes every open value (empty once done),
    /// written piece by piece: its length is at most the open values' count
    /// times [`Grammar::longest_shortest`], and no more is ever held.
    pub fn completion(&self, g: &Grammar) -> Vec<u8> {
        let mut s = self.clone();
        let mut out = Vec::new();
        // Each round writes a piece or closes a frame; a schema's values are finite, so the rounds are too.
        while out.len() <= MAX_COMPLETION {
            let Some(&top) = s.frames.last() else { break };
            let more: Vec<u8> = match top {
                Frame::Value(id) => g.opening(id),
                Frame::Object { node, step, next, .. } => {
                    let Node::Object { props, keys, free } = &g.nodes[node as usize] else { break };
                    let required = props.iter().enumerate().skip(next as usize).find(|(_, p)| p.required);
                    match (step, required) {
                        (ObjStep::Colon, _) => b":".to_vec(),
                        (ObjStep::Open | ObjStep::AfterValue, None) => b"}".to_vec(),
                        (ObjStep::AfterValue, Some(_)) => b",".to_vec(),
                        (ObjStep::Open | ObjStep::Comma, Some((i, _))) => g.literals[*keys as usize][i].clone(),
                        (ObjStep::Comma, None) if free.is_some() => b"\"\"".to_vec(),
                        (ObjStep::Comma, None) => g.literals[*keys as usize][next as usize].clone(),
                        (ObjStep::Key, _) => break,
                    }
                }
                Frame::Array { node, step, count } => {
                    let Node::Array { items, min, .. } = g.nodes[node as usize] else { break };
                    match step {
                        ArrStep::Open if min == 0 => b"]".to_vec(),
                        ArrStep::AfterValue if count >= min => b"]".to_vec(),
                        ArrStep::AfterValue => b",".to_vec(),
                        ArrStep::Open | ArrStep::Comma => g.opening(items),
                    }
                }
                Frame::String { esc, cont, lo, .. } => match (cont, esc) {
                    (1.., _) => vec![lo],
                    (0, 1) => b"n".to_vec(),
                    (0, 2..=5) => b"0".to_vec(),
                    _ => b"\"".to_vec(),
                },
                Frame::Number { step, .. } => match step {
                    NumStep::Minus | NumStep::Dot | NumStep::Exp | NumStep::ExpSign => b"0".to_vec(),
                    _ => {
                        s.frames.pop();
                        s.child_done(g, 0);
                        continue;
                    }
                },
                Frame::Literal { set, at, alive } => {
                    let texts = &g.literals[set as usize];
                    let best = (0..texts.len())
                        .filter(|i| alive & (1 << i) != 0)
                        .min_by_key(|&i| texts[i].len())
                        .expect("a literal frame has a text alive");
                    if texts[best].len() == at as usize {
                        s.frames.pop();
                        s.child_done(g, best as u16);
                        continue;
                    }
                    texts[best][at as usize..].to_vec()
                }
            };
            if !s.feed(g, &more) {
                break;
            }
            out.extend_from_slice(&more);
        }
        out
    }
}

/// The bytes each token of a vocabulary spells (`None`: a special token,
/// never part of a JSON text).
pub struct TokenBytes(pub Vec<Option<Box<[u8]>>>);

impl TokenBytes {
    /// Reads the bytes of every token of `tokenizer`: byte-level BPE (GPT-2,
    /// Llama 3, SmolLM) maps characters back to bytes; SentencePiece-style
    /// vocabularies turn `▁` into a space and `<0xNN>` into its byte.
    pub fn of(tokenizer: &tokenizers::Tokenizer) -> TokenBytes {
        let byte_level = matches!(tokenizer.get_decoder(), Some(tokenizers::decoders::DecoderWrapper::ByteLevel(_)));
        let unicode_to_byte: HashMap<char, u8> = byte_level_chars().into_iter().map(|(b, c)| (c, b)).collect();
        let special: std::collections::HashSet<u32> =
            tokenizer.get_added_tokens_decoder().into_iter().filter(|(_, t)| t.special).map(|(id, _)| id).collect();
        let n = tokenizer.get_vocab_size(true);
        let tokens = (0..n as u32)
            .map(|id| {
                if special.contains(&id) {
                    return None;
                }
                let piece = tokenizer.id_to_token(id)?;
                let bytes: Vec<u8> = if byte_level {
                    piece.chars().map(|c| unicode_to_byte.get(&c).copied()).collect::<Option<Vec<u8>>>()?
                } else if let Some(hex) = piece.strip_prefix("<0x").and_then(|p| p.strip_suffix('>')) {
                    vec![u8::from_str_radix(hex, 16).ok()?]
                } else {
                    piece.replace('\u{2581}', " ").into_bytes()
                };
                (!bytes.is_empty()).then(|| bytes.into_boxed_slice())
            })
            .collect();
        TokenBytes(tokens)
    }

    /// Bytes of the longest token.
    pub fn longest(&self) -> usize {
        self.0.iter().flatten().map(|t| t.len()).max().unwrap_or(1)
    }
}

/// GPT-2's byte ↔ printable character table (byte-level BPE).
fn byte_level_chars() -> Vec<(u8, char)> {
    let mut out = Vec::with_capacity(256);
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            char::from(b)
        } else {
            extra += 1;
            char::from_u32(255 + extra).expect("a valid char")
        };
        out.push((b, c));
    }
    out
}

/// A request's constraint: the grammar, where the answer stands, and a scratch state for trying tokens.
pub struct Constraint {
    grammar: std::sync::Arc<Grammar>,
    state: JsonState,
    scratch: JsonState,
}

impl Constraint {
    pub fn new(grammar: std::sync::Arc<Grammar>) -> Constraint {
        let state = grammar.start();
        Constraint { scratch: state.clone(), grammar, state }
    }

    /// True once the value is complete.
    pub fn is_done(&self) -> bool {
        self.state.is_done()
    }

    /// Whether `token` may come next.
    pub fn allows(&mut self, vocab: &TokenBytes, token: usize) -> bool {
        let Some(Some(bytes)) = vocab.0.get(token) else { return false };
        self.scratch.copy_from(&self.state);
        self.scratch.feed(&self.grammar, bytes)
    }

    /// Takes `token` as read; false when it cannot continue the value.
    pub fn accept(&mut self, vocab: &TokenBytes, token: usize) -> bool {
        match vocab.0.get(token) {
            Some(Some(bytes)) => self.state.feed(&self.grammar, bytes),
            _ => false,
        }
    }

    /// The text that closes the value (for an answer cut by its token budget).
    pub fn completion(&self) -> String {
        let bytes = self.state.completion(&self.grammar);
        // Continuation bytes end a character the decoded text already shows as U+FFFD.
        let start = bytes.iter().take_while(|&&b| (0x80..0xC0).contains(&b)).count();
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }
}

/// What `response_format` asks for: `None` for text, else the grammar.
pub fn parse_response_format(v: &Value) -> Result<Option<Grammar>, String> {
    match v.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Grammar::any_object())),
        Some("json_schema") => {
            let schema = v
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .ok_or("response_format json_schema needs {\"json_schema\": {\"name\": …, \"schema\": {…}}}")?;
            Grammar::from_schema(schema).map(Some).map_err(|e| format!("response_format json_schema: {e}"))
        }
        Some(other) => Err(format!("unknown response_format type '{other}' (text, json_object or json_schema)")),
        None => Err("response_format needs a \"type\" (text, json_object or json_schema)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Feeds `text` whole; returns the state when every byte was taken.
    fn read(g: &Grammar, text: &str) -> Option<JsonState> {
        let mut s = g.start();
        s.feed(g, text.as_bytes()).then_some(s)
    }

    fn receipt() -> Value {
        json!({
            "type": "object",
            "properties": {
                "merchant": {"type": "string", "maxLength": 40},
                "date": {"type": "string"},
                "total": {"type": "number"},
                "paid": {"type": "boolean"},
                "currency": {"enum": ["EUR", "USD", "GBP"]},
                "items": {"type": "array", "maxItems": 3, "items": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "qty": {"type": "integer"}, "note": {"type": ["string", "null"]}},
                    "required": ["name", "qty"]
                }}
            },
            "required": ["merchant", "total", "items"]
        })
    }

    #[test]
    fn texts_that_keep_to_the_schema_are_read_and_others_refused() {
        let g = Grammar::from_schema(&receipt()).unwrap();
        for ok in [
            r#"{"merchant":"Bio Markt","total":12.5,"items":[]}"#,
            r#"{ "merchant": "A", "date": "2024-01-02", "total": -0.5e3, "paid": true, "currency": "EUR", "items": [ {"name": "x", "qty": 2, "note": null} ] }"#,
            "{\n  \"merchant\": \"caf\u{e9} \\\"x\\\" \\u00e9\",\n  \"total\": 0,\n  \"items\": [{\"name\": \"a\", \"qty\": -3}]\n}",
        ] {
            let s = read(&g, ok).unwrap_or_else(|| panic!("refused {ok}"));
            assert!(s.is_done(), "{ok}");
        }
        for bad in [
            r#"{"total":1"#,                                               // merchant comes first
            r#"{"merchant":"A","items":[]"#,                               // total is required
            r#"{"merchant":"A","total":1,"items":[],"extra":1"#,           // not a property
            r#"{"merchant":1"#,                                            // a number for a string
            r#"{"merchant":"A","total":01"#,                               // a leading zero
            r#"{"merchant":"A","total":1,"currency":"JPY""#,               // not in the enum
            r#"{"merchant":"A","total":1,"items":[{"name":"a","qty":1.5"#, // not an integer
            r#"{"merchant":"A","total":1,"items":[{},{},{},{}"#,           // over maxItems (and missing fields)
            "{\"merchant\":\"a\nb\"",                                      // a raw newline in a string
            r#"{"merchant":"\x"#,                                          // a bad escape
            "[",                                                           // the root is an object
        ] {
            assert!(read(&g, bad).is_none(), "took {bad}");
        }
        let long = format!(r#"{{"merchant":"{}""#, "m".repeat(41));
        assert!(read(&g, &long).is_none(), "maxLength 40 holds");
        assert!(read(&g, &format!("{{{}\"merchant\"", " ".repeat(40))).is_none(), "whitespace runs are bounded");
    }

    #[test]
    fn the_completion_closes_every_open_value_with_the_required_fields() {
        let g = Grammar::from_schema(&receipt()).unwrap();
        for prefix in [
            "",
            "{",
            r#"{"merch"#,
            r#"{"merchant":"Caf"#,
            r#"{"merchant":"A\"#,
            r#"{"merchant":"A\u00"#,
            r#"{"merchant":"A","total":-"#,
            r#"{"merchant":"A","total":1.5e"#,
            r#"{"merchant":"A","total":12"#,
            r#"{"merchant":"A","total":12,"pa"#,
            r#"{"merchant":"A","total":12,"currency":"U"#,
            r#"{"merchant":"A","total":12,"items":[{"name":"x","qty":1,"note":n"#,
            r#"{"merchant":"A","total":12,"items":[{"name":"x","#,
        ] {
            let s = read(&g, prefix).unwrap_or_else(|| panic!("refused {prefix}"));
            let tail = s.completion(&g);
            let whole = [prefix.as_bytes(), &tail].concat();
            let v: Value =
                serde_json::from_slice(&whole).unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(&whole)));
            assert!(v["merchant"].is_string() && v["total"].is_number() && v["items"].is_array(), "{v}");
            assert!(read(&g, std::str::from_utf8(&whole).unwrap()).unwrap().is_done());
        }
        // Inside a multi-byte character: the completion finishes it.
        let mut s = g.start();
        assert!(s.feed(&g, b"{\"merchant\":\"\xE2\x82"));
        let whole = [b"{\"merchant\":\"\xE2\x82".as_slice(), &s.completion(&g)].concat();
        assert!(serde_json::from_slice::<Value>(&whole).is_ok(), "{}", String::from_utf8_lossy(&whole));
    }

    #[test]
    fn json_object_takes_any_object_and_nothing_after_it() {
        let g = Grammar::any_object();
        let s = read(&g, r#"{"a": [1, 2.5, {"b": null}], "c": {"d": [true, false, "x"]}}"#).unwrap();
        assert!(s.is_done());
        assert!(!s.clone().feed(&g, b" "), "nothing after the value");
        assert!(read(&g, "[1]").is_none() && read(&g, "\"a\"").is_none() && read(&g, "1").is_none());
        assert_eq!(g.start().completion(&g), b"{}");
        let deep = "{\"a\":".repeat(MAX_DEPTH);
        assert!(read(&g, &deep).is_none(), "nesting is bounded");
    }

    #[test]
    fn refs_anyof_and_consts_compile_and_unsupported_schemas_are_refused_with_the_path() {
        // What pydantic writes for a model with a nested model and an optional field.
        let schema = json!({
            "$defs": {"Item": {"properties": {"name": {"title": "Name", "type": "string"}}, "required": ["name"], "title": "Item", "type": "object"}},
            "properties": {
                "items": {"items": {"$ref": "#/$defs/Item"}, "title": "Items", "type": "array"},
                "shop": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": null},
                "kind": {"const": "receipt"}
            },
            "required": ["items", "kind"], "title": "Receipt", "type": "object"
        });
        let g = Grammar::from_schema(&schema).unwrap();
        assert!(read(&g, r#"{"items":[{"name":"a"}],"shop":null,"kind":"receipt"}"#).unwrap().is_done());
        assert!(read(&g, r#"{"items":[],"kind":"receipt"}"#).unwrap().is_done());
        assert!(read(&g, r#"{"items":[],"kind":"other"#).is_none());
        for (schema, words) in [
            (
                json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}),
                "properties.n: 'minimum' is not supported",
            ),
            (
                json!({"type": "object", "properties": {"s": {"type": "string", "pattern": "^a"}}}),
                "'pattern' is not supported",
            ),
            (json!({"type": "string"}), "the root must be an object"),
            (json!({"type": "object", "required": ["x"]}), "required 'x' is not among"),
            (
                json!({"type": "object", "properties": {"a": {"anyOf": [{"type": "object"}, {"type": "object", "properties": {"b": {}}}]}}}),
                "begin alike",
            ),
            (
                json!({"$defs": {"N": {"type": "object", "properties": {"next": {"$ref": "#/$defs/N"}}}}, "$ref": "#/$defs/N"}),
                "recursive",
            ),
            (json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}}), "does not name a part"),
            (json!({"type": "object", "properties": {"a": {"type": "date"}}}), "unknown type 'date'"),
            (json!({"type": "array", "minItems": 3, "maxItems": 2}), "minItems is over maxItems"),
        ] {
            let e = Grammar::from_schema(&schema).unwrap_err();
            assert!(e.contains(words), "{schema} -> {e}");
        }
        assert!(
            parse_response_format(&json!({"type": "xml"})).unwrap_err().contains("unknown response_format type 'xml'")
        );
        assert!(parse_response_format(&json!({"type": "json_schema"})).unwrap_err().contains("needs"));
        assert!(parse_response_format(&json!({"type": "text"})).unwrap().is_none());
    }

    /// A `$ref` chain of `hops` links, each `wrap`ped (`{"$ref": …}` or a one-branch `anyOf`).
    fn chain(hops: usize, one_branch_any_of: bool) -> Value {
        let mut defs = serde_json::Map::new();
        for i in 0..hops {
            let next = json!({"$ref": format!("#/$defs/d{}", i + 1)});
            defs.insert(format!("d{i}"), if one_branch_any_of { json!({"anyOf": [next]}) } else { next });
        }
        defs.insert(format!("d{hops}"), json!({"type": "object"}));
        json!({"$defs": defs, "$ref": "#/$defs/d0"})
    }

    #[test]
    fn every_schema_dimension_has_a_limit_refused_up_front_with_the_path() {
        let t = std::time::Instant::now();
        for (schema, words) in [
            // The reported attacks: 3,000 hops (106 KB) and nested one-branch anyOfs.
            (chain(3000, false), "bytes; at most 65536"),
            (chain(1000, true), "is hop 17 of a chain; at most 16"),
            (chain(40, false), "is hop 17 of a chain; at most 16"),
            // Nested inline, past the depth limit (within serde_json's own nesting limit).
            (
                (0..40)
                    .fold(json!({"type": "object"}), |inner, _| json!({"type": "object", "properties": {"a": inner}})),
                "nested over 32 deep",
            ),
            ((0..60).fold(json!({"type": "object"}), |inner, _| json!({"anyOf": [inner]})), "nested over 32 deep"),
            (
                json!({"type": "object", "properties": {"a": {"const": "x".repeat(5000)}}}),
                "properties.a: a const, enum value or property name of 5002 bytes; at most 4096",
            ),
            (
                json!({"type": "object", "properties": {"x".repeat(5000): {"type": "string"}}}),
                "property name of 5002 bytes",
            ),
            (
                json!({"type": "object", "properties": {"a": {"anyOf": (0..17).map(|i| json!({"const": i})).collect::<Vec<_>>()}}}),
                "17 alternatives; at most 16",
            ),
            (
                json!({"type": "object", "properties": {"a": {"enum": (0..65).collect::<Vec<_>>()}}}),
                "65 values; at most 64",
            ),
            (json!({"type": "object", "description": "d".repeat(70_000)}), "bytes; at most 65536"),
        ] {
            let e = Grammar::from_schema(&schema).unwrap_err();
            assert!(e.contains(words), "{e} (wanted {words})");
        }
        // A chain within the limits compiles, and so does a one-branch anyOf (it is its branch).
        let g = Grammar::from_schema(&chain(15, true)).unwrap();
        assert!(read(&g, "{}").unwrap().is_done());
        assert!(t.elapsed() < std::time::Duration::from_secs(2), "refusals are cheap: {:?}", t.elapsed());
    }

    #[test]
    fn the_closing_text_is_made_lazily_and_a_schema_that_cannot_fit_is_refused_with_the_numbers() {
        // Arrays 5 deep, each at least 64 long: 64^5 integers in its shortest value (2.1 GB of text).
        let deep = (0..5)
            .fold(json!({"type": "integer"}), |inner, _| json!({"type": "array", "minItems": 64, "items": inner}));
        let t = std::time::Instant::now();
        let g = Grammar::from_schema(&json!({"type": "object", "properties": {"a": deep}, "required": ["a"]})).unwrap();
        assert!(t.elapsed() < std::time::Duration::from_millis(500), "compiling is linear: {:?}", t.elapsed());
        assert!(g.longest_shortest() > 2_000_000_000, "{}", g.longest_shortest());
        let e = g.fits(256, 64).unwrap_err();
        assert!(e.contains("bytes, at least") && e.contains("tokens of this model; max_tokens is 256"), "{e}");
        // Small enough: the completion is the shortest value, written piece by piece.
        let small =
            (0..2).fold(json!({"type": "integer"}), |inner, _| json!({"type": "array", "minItems": 3, "items": inner}));
        let g = Grammar::from_schema(&small).unwrap();
        g.fits(16, 4).unwrap();
        assert_eq!(g.start().completion(&g), b"[[0,0,0],[0,0,0],[0,0,0]]");
        assert_eq!(g.longest_shortest(), 25);
        let g = Grammar::from_schema(&receipt()).unwrap();
        assert_eq!(String::from_utf8(g.start().completion(&g)).unwrap(), r#"{"merchant":"","total":0,"items":[]}"#);
    }

    #[test]
    fn a_number_at_its_digit_limit_takes_no_dot_so_its_answer_still_closes() {
        // Found by the schema fuzz target: 18 digits and a dot were taken, and no digit could follow.
        let g = Grammar::from_schema(&json!({"type": "array", "minItems": 4, "items": {}})).unwrap();
        let mut s = read(&g, "[[999991999999922222").unwrap();
        assert!(!s.clone().feed(&g, b"."), "no dot after 18 digits");
        assert!(read(&g, "[[99999199999992222.").is_some(), "a dot after 17");
        assert!(s.feed(&g, b"e"), "an exponent is still fine");
        let whole = [b"[[999991999999922222e".to_vec(), s.completion(&g)].concat();
        let done = read(&g, std::str::from_utf8(&whole).unwrap()).unwrap();
        assert!(done.is_done(), "{}", String::from_utf8_lossy(&whole));
        serde_json::from_slice::<Value>(&whole).unwrap();
    }

    #[test]
    fn literals_that_are_prefixes_of_each_other_end_at_the_next_byte() {
        let schema = json!({"type": "object", "properties": {"n": {"enum": [1, 10, 100]}, "m": {"type": "integer"}}, "required": ["n", "m"]});
        let g = Grammar::from_schema(&schema).unwrap();
        for (text, value) in [(r#"{"n":1,"m":0}"#, 1), (r#"{"n":10,"m":0}"#, 10), (r#"{"n": 100 ,"m":0}"#, 100)] {
            assert!(read(&g, text).unwrap().is_done(), "{text}");
            assert_eq!(serde_json::from_str::<Value>(text).unwrap()["n"], value);
        }
        assert!(read(&g, r#"{"n":1000"#).is_none());
        assert!(read(&g, r#"{"n":11"#).is_none());
    }

    #[test]
    fn byte_level_vocabularies_map_back_to_bytes() {
        let table = byte_level_chars();
        assert_eq!(table[b' ' as usize].1, '\u{120}', "GPT-2 spells a space Ġ");
        assert_eq!(table[b'\n' as usize].1, '\u{10A}', "and a newline Ċ");
        assert_eq!(table[b'a' as usize].1, 'a');
        let distinct: std::collections::HashSet<char> = table.iter().map(|(_, c)| *c).collect();
        assert_eq!(distinct.len(), 256);
    }

    /// A random walk over a small vocabulary, choosing only tokens the
    /// constraint allows, always ends in a value that parses and keeps to
    /// the schema (with the completion where the budget ran out).
    #[test]
    fn random_walks_over_allowed_tokens_always_give_valid_json() {
        let pieces = [
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "\"",
            " ",
            "\n",
            "\"merchant\"",
            "\"total\"",
            "\"items\"",
            "\"name\"",
            "\"qty\"",
            "\"paid\"",
            "\"currency\"",
            "\"note\"",
            "\"date\"",
            "EUR",
            "\"EUR\"",
            "USD\"",
            "1",
            "0",
            "-",
            ".",
            "e",
            "5",
            "true",
            "false",
            "null",
            "tr",
            "ue",
            "a",
            "b c",
            "\\",
            "n",
            "u00e9",
            "é",
            "\u{20ac}",
            "\"}",
            "\"]",
            "},",
            "\":",
            "12",
            "0.5",
            "x\"",
        ];
        // Every printable ASCII byte is a token too, as in real byte-level vocabularies.
        let singles: Vec<String> = (b' '..=b'~').map(|b| char::from(b).to_string()).collect();
        let pieces: Vec<&str> = pieces.iter().copied().chain(singles.iter().map(String::as_str)).collect();
        let vocab = TokenBytes(pieces.iter().map(|p| Some(p.as_bytes().to_vec().into_boxed_slice())).collect());
        let grammar = std::sync::Arc::new(Grammar::from_schema(&receipt()).unwrap());
        let mut rng = 0x9E37_79B9u64;
        let mut next = |n: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n as u64) as usize
        };
        let mut finished = 0;
        for _ in 0..300 {
            let mut c = Constraint::new(grammar.clone());
            let mut text = String::new();
            for _ in 0..next(120) {
                let allowed: Vec<usize> = (0..pieces.len()).filter(|&t| c.allows(&vocab, t)).collect();
                assert!(!allowed.is_empty(), "some token always continues: {text}");
                let t = allowed[next(allowed.len())];
                assert!(c.accept(&vocab, t));
                text.push_str(pieces[t]);
                if c.is_done() {
                    finished += 1;
                    break;
                }
            }
            text.push_str(&c.completion());
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert!(v["merchant"].as_str().is_some_and(|m| m.chars().count() <= 40), "{text}");
            assert!(v["total"].is_number() && v["items"].as_array().is_some_and(|i| i.len() <= 3), "{text}");
            for item in v["items"].as_array().unwrap() {
                assert!(item["name"].is_string() && item["qty"].is_i64(), "{text}");
            }
            if let Some(c) = v.get("currency") {
                assert!(["EUR", "USD", "GBP"].contains(&c.as_str().unwrap()), "{text}");
            }
        }
        assert!(finished > 0, "some walks close the value themselves");
    }
}
