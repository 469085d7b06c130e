//! Label and field selectors with the grammar of k8s.io/apimachinery.
//!
//! Hand-written: no maintained Rust crate parses Kubernetes selector strings
//! (kube-rs only builds them), and the grammar is small.

use std::collections::BTreeMap;

use serde_json::Value;

use super::errors::ApiError;
use super::resources::ResourceType;

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Eq,
    NotEq,
    In,
    NotIn,
    Exists,
    NotExists,
    Gt,
    Lt,
}

#[derive(Debug, Clone)]
struct Requirement {
    key: String,
    op: Op,
    values: Vec<String>,
}

/// A parsed `labelSelector`; the empty selector matches everything.
#[derive(Debug, Clone, Default)]
pub struct LabelSelector(Vec<Requirement>);

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Not,
    Eq,
    DoubleEq,
    NotEq,
    Open,
    Close,
    Comma,
    Gt,
    Lt,
    End,
}

impl Token {
    fn text(&self) -> String {
        match self {
            Token::Ident(s) => s.clone(),
            Token::Not => "!".into(),
            Token::Eq => "=".into(),
            Token::DoubleEq => "==".into(),
            Token::NotEq => "!=".into(),
            Token::Open => "(".into(),
            Token::Close => ")".into(),
            Token::Comma => ",".into(),
            Token::Gt => ">".into(),
            Token::Lt => "<".into(),
            Token::End => String::new(),
        }
    }
}

fn lex(input: &str) -> Vec<Token> {
    let chars: Vec<char> = input.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' => i += 1,
            '(' => {
                out.push(Token::Open);
                i += 1
            }
            ')' => {
                out.push(Token::Close);
                i += 1
            }
            ',' => {
                out.push(Token::Comma);
                i += 1
            }
            '>' => {
                out.push(Token::Gt);
                i += 1
            }
            '<' => {
                out.push(Token::Lt);
                i += 1
            }
            '!' if chars.get(i + 1) == Some(&'=') => {
                out.push(Token::NotEq);
                i += 2
            }
            '!' => {
                out.push(Token::Not);
                i += 1
            }
            '=' if chars.get(i + 1) == Some(&'=') => {
                out.push(Token::DoubleEq);
                i += 2
            }
            '=' => {
                out.push(Token::Eq);
                i += 1
            }
            _ => {
                let start = i;
                while i < chars.len() && !" \t(),><!=".contains(chars[i]) {
                    i += 1;
                }
                out.push(Token::Ident(chars[start..i].iter().collect()));
            }
        }
    }
    out.push(Token::End);
    out
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> &Token {
        &self.tokens[self.pos.min(self.tokens.len() - 1)]
    }

    fn next(&mut self) -> Token {
        let t = self.peek().clone();
        self.pos += 1;
        t
    }

    fn error(found: &Token, expected: &str) -> ApiError {
        ApiError::bad_request(format!("unable to parse requirement: found '{}', expected: {expected}", found.text()))
    }

    fn requirement(&mut self) -> Result<Requirement, ApiError> {
        if *self.peek() == Token::Not {
            self.next();
            let key = self.ident("identifier")?;
            return Ok(Requirement { key, op: Op::NotExists, values: Vec::new() });
        }
        let key = self.ident("identifier")?;
        let op = match self.peek().clone() {
            Token::Comma | Token::End => return Ok(Requirement { key, op: Op::Exists, values: Vec::new() }),
            Token::Eq | Token::DoubleEq => Op::Eq,
            Token::NotEq => Op::NotEq,
            Token::Gt => Op::Gt,
            Token::Lt => Op::Lt,
            Token::Ident(word) if word == "in" => Op::In,
            Token::Ident(word) if word == "notin" => Op::NotIn,
            other => return Err(Self::error(&other, "'=', '!=', '==', 'in', notin'")),
        };
        self.next();
        let values = match op {
            Op::In | Op::NotIn => self.value_set()?,
            _ => match self.peek().clone() {
                Token::Ident(v) => {
                    self.next();
                    vec![v]
                }
                // `key=` selects an empty value.
                Token::Comma | Token::End => vec![String::new()],
                other => return Err(Self::error(&other, "identifier")),
            },
        };
        if matches!(op, Op::Gt | Op::Lt) && values[0].parse::<i64>().is_err() {
            return Err(ApiError::bad_request(format!(
                "unable to parse requirement: for 'Gt', 'Lt' operators, the value must be an integer: {}",
                values[0]
            )));
        }
        Ok(Requirement { key, op, values })
    }

    fn ident(&mut self, expected: &str) -> Result<String, ApiError> {
        match self.next() {
            Token::Ident(s) => Ok(s),
            other => Err(Self::error(&other, expected)),
        }
    }

    fn value_set(&mut self) -> Result<Vec<String>, ApiError> {
        match self.next() {
            Token::Open => {}
            other => return Err(Self::error(&other, "'('")),
        }
        let mut values = Vec::new();
        loop {
            match self.next() {
                Token::Ident(v) => values.push(v),
                Token::Close if values.is_empty() => return Ok(values),
                other => return Err(Self::error(&other, "',' or ')'")),
            }
            match self.next() {
                Token::Comma => continue,
                Token::Close => return Ok(values),
                other => return Err(Self::error(&other, "',' or ')'")),
            }
        }
    }
}

impl LabelSelector {
    pub fn parse(input: &str) -> Result<Self, ApiError> {
        let mut parser = Parser { tokens: lex(input), pos: 0 };
        let mut reqs = Vec::new();
        if *parser.peek() == Token::End {
            return Ok(Self(reqs));
        }
        loop {
            reqs.push(parser.requirement()?);
            match parser.next() {
                Token::Comma => continue,
                Token::End => return Ok(Self(reqs)),
                other => return Err(Parser::error(&other, "','")),
            }
        }
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| {
            let value = labels.get(&r.key);
            match r.op {
                Op::Eq => value == Some(&r.values[0]),
                Op::NotEq => value != Some(&r.values[0]),
                Op::In => value.is_some_and(|v| r.values.contains(v)),
                Op::NotIn => value.is_none_or(|v| !r.values.contains(v)),
                Op::Exists => value.is_some(),
                Op::NotExists => value.is_none(),
                Op::Gt | Op::Lt => {
                    let (Some(Ok(have)), Ok(want)) = (value.map(|v| v.parse::<i64>()), r.values[0].parse::<i64>())
                    else {
                        return false;
                    };
                    if r.op == Op::Gt { have > want } else { have < want }
                }
            }
        })
    }
}

/// A parsed `fieldSelector`: `a=b`, `a==b`, `a!=b`, comma-separated.
#[derive(Debug, Clone, Default)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(input: &str, rt: &ResourceType) -> Result<Self, ApiError> {
        let mut terms = Vec::new();
        for term in input.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, true, v)
            } else {
                return Err(ApiError::bad_request(format!("invalid selector: '{input}'; can't understand '{term}'")));
            };
            let field = field.trim();
            let supported =
                field == "metadata.name" || field == "metadata.namespace" || rt.extra_field_labels.contains(&field);
            if !supported {
                // Types with only the default field set (apps, CRs) answer
                // differently from those with their own conversion function.
                let message = if rt.group == "apps" {
                    format!("\"{field}\" is not a known field selector: only \"metadata.name\", \"metadata.namespace\"")
                } else {
                    format!("field label not supported: {field}")
                };
                return Err(ApiError::bad_request(message));
            }
            terms.push((field.to_string(), equal, value.trim().to_string()));
        }
        Ok(Self(terms))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(field, equal, want)| {
            let mut cur = obj;
            for part in field.split('.') {
                cur = &cur[part];
            }
            let have = match cur {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            (have == *want) == *equal
        })
    }
}

/// Labels of a stored object as a map (absent labels: empty).
pub fn labels_of(obj: &Value) -> BTreeMap<String, String> {
    obj["metadata"]["labels"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
        .unwrap_or_default()
}

/// Both selectors of a request.
#[derive(Debug, Clone, Default)]
pub struct Selectors {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Selectors {
    pub fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(&labels_of(obj)) && self.fields.matches(obj)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn set_based_and_equality() {
        let sel = LabelSelector::parse("tier in (frontend,backend),app!=api").expect("parses");
        assert!(sel.matches(&labels(&[("tier", "frontend"), ("app", "web")])));
        assert!(!sel.matches(&labels(&[("tier", "backend"), ("app", "api")])));
        assert!(!sel.matches(&labels(&[("app", "web")])));
        let sel = LabelSelector::parse("!gone,here,x notin (a)").expect("parses");
        assert!(sel.matches(&labels(&[("here", "")])));
        assert!(!sel.matches(&labels(&[("here", ""), ("x", "a")])));
    }

    #[test]
    fn malformed_is_bad_request_with_the_real_message() {
        let err = LabelSelector::parse("app in (web").expect_err("must fail");
        let status = err.to_status();
        assert_eq!(status["message"], "unable to parse requirement: found '', expected: ',' or ')'");
    }
}
