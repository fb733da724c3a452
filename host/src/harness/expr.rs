//! Arithmetic for prompt checks: `+ - * /`, parentheses, numbers and parameter names.
//!
//! [`Expr::parse`] turns `2 * a * b / (a + b)` into a tree; [`Expr::eval`] computes it from the
//! drawn parameter values. Small on purpose: a check's expected answer is a formula over the
//! numbers the host drew, nothing more.

use std::collections::BTreeMap;

/// A parsed arithmetic expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Num(f64),
    Var(String),
    Neg(Box<Expr>),
    Bin(Box<Expr>, char, Box<Expr>),
}

impl Expr {
    /// Parses `text`, or says what is wrong with it.
    pub fn parse(text: &str) -> Result<Expr, String> {
        let tokens = lex(text)?;
        let mut p = Parser { tokens, pos: 0 };
        let e = p.sum()?;
        match p.tokens.get(p.pos) {
            None => Ok(e),
            Some(t) => Err(format!("unexpected {t:?}")),
        }
    }

    /// Names of the variables the expression reads.
    pub fn variables(&self) -> Vec<String> {
        match self {
            Expr::Num(_) => vec![],
            Expr::Var(v) => vec![v.clone()],
            Expr::Neg(e) => e.variables(),
            Expr::Bin(a, _, b) => [a.variables(), b.variables()].concat(),
        }
    }

    /// The value with `vars` substituted; division by zero and unknown names are errors.
    pub fn eval(&self, vars: &BTreeMap<String, f64>) -> Result<f64, String> {
        Ok(match self {
            Expr::Num(n) => *n,
            Expr::Var(v) => *vars
                .get(v)
                .ok_or_else(|| format!("unknown variable {v:?}"))?,
            Expr::Neg(e) => -e.eval(vars)?,
            Expr::Bin(a, op, b) => {
                let (x, y) = (a.eval(vars)?, b.eval(vars)?);
                match op {
                    '+' => x + y,
                    '-' => x - y,
                    '*' => x * y,
                    _ if y == 0.0 => return Err("division by zero".into()),
                    _ => x / y,
                }
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Num(f64),
    Ident(String),
    Op(char),
}

fn lex(text: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if "+-*/()".contains(c) {
            out.push(Token::Op(c));
            i += 1;
        } else if c.is_ascii_digit() || c == '.' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            let s: String = chars[start..i].iter().collect();
            out.push(Token::Num(
                s.parse().map_err(|_| format!("bad number {s:?}"))?,
            ));
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(Token::Ident(chars[start..i].iter().collect()));
        } else {
            return Err(format!("unexpected character {c:?}"));
        }
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn peek_op(&self) -> Option<char> {
        match self.tokens.get(self.pos) {
            Some(Token::Op(c)) => Some(*c),
            _ => None,
        }
    }

    fn sum(&mut self) -> Result<Expr, String> {
        let mut e = self.product()?;
        while let Some(op @ ('+' | '-')) = self.peek_op() {
            self.pos += 1;
            e = Expr::Bin(Box::new(e), op, Box::new(self.product()?));
        }
        Ok(e)
    }

    fn product(&mut self) -> Result<Expr, String> {
        let mut e = self.atom()?;
        while let Some(op @ ('*' | '/')) = self.peek_op() {
            self.pos += 1;
            e = Expr::Bin(Box::new(e), op, Box::new(self.atom()?));
        }
        Ok(e)
    }

    fn atom(&mut self) -> Result<Expr, String> {
        let token = self.tokens.get(self.pos).cloned().ok_or("unexpected end")?;
        self.pos += 1;
        match token {
            Token::Num(n) => Ok(Expr::Num(n)),
            Token::Ident(v) => Ok(Expr::Var(v)),
            Token::Op('-') => Ok(Expr::Neg(Box::new(self.atom()?))),
            Token::Op('(') => {
                let e = self.sum()?;
                match self.tokens.get(self.pos) {
                    Some(Token::Op(')')) => {
                        self.pos += 1;
                        Ok(e)
                    }
                    _ => Err("missing ')'".into()),
                }
            }
            Token::Op(c) => Err(format!("unexpected {c:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluates_with_precedence_and_variables() {
        let vars = BTreeMap::from([("a".to_string(), 60.0), ("b".to_string(), 40.0)]);
        let e = Expr::parse("2 * a * b / (a + b)").unwrap();
        assert_eq!(e.eval(&vars).unwrap(), 48.0);
        assert_eq!(
            Expr::parse("1 + 2 * 3 - -4").unwrap().eval(&vars).unwrap(),
            11.0
        );
        assert_eq!(e.variables(), vec!["a", "b", "a", "b"]);
    }

    #[test]
    fn reports_errors() {
        assert!(Expr::parse("(1 + 2").unwrap_err().contains(")"));
        assert!(Expr::parse("1 $ 2").unwrap_err().contains("$"));
        assert!(Expr::parse("1 2").is_err());
        assert!(Expr::parse("1 / (a - a)")
            .unwrap()
            .eval(&BTreeMap::from([("a".into(), 1.0)]))
            .is_err());
    }
}
