//! A strategy's parameters as the outside world sees them: read from a request's mode object
//! (`multi_exit`, or one of an inspection's strategies) field by field with refusals that name
//! the field, checked against the model's shape, echoed back as JSON, and offered to the
//! playground as a form. Each strategy file uses these; none parses JSON by hand.

use serde::Serialize;
use serde_json::{Map, Value};

/// What a strategy's parameters are checked against.
#[derive(Debug, Clone, Copy)]
pub struct ModelShape<'a> {
    /// Blocks of the model (the original head reads the last).
    pub num_layers: usize,
    /// The layers with a trained exit head, ascending.
    pub exits: &'a [usize],
    /// Whether the original head is the token embedding.
    pub tied_head: bool,
    pub vocab_size: usize,
}

impl ModelShape<'_> {
    /// The exits below the top block (the top's exit, if any, reads what the original does).
    pub fn exits_below_top(&self) -> impl Iterator<Item = usize> + '_ {
        self.exits.iter().copied().filter(|&e| e < self.num_layers)
    }
}

/// A refused parameter: the field it names (`multi_exit.alpha`) and a message that says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParamError {
    pub param: String,
    pub message: String,
}

impl ParamError {
    pub fn new(param: String, message: String) -> Self {
        Self { param, message }
    }
}

/// `[lo, hi]`, or `(lo, hi]` when `lo_open`.
fn interval(lo: f64, hi: f64, lo_open: bool) -> String {
    format!("{}{lo}, {hi}]", if lo_open { "(" } else { "[" })
}

/// A mode object's fields, taken one by one; what no strategy field claims is refused first.
#[derive(Debug)]
pub struct Fields<'a> {
    object: &'a str,
    map: Map<String, Value>,
}

impl<'a> Fields<'a> {
    /// `map` (without `mode`) of the object named `object`, for a strategy that takes `known`.
    pub fn new(
        object: &'a str,
        mode: &str,
        known: &[&str],
        map: Map<String, Value>,
    ) -> Result<Self, ParamError> {
        if let Some(unknown) = map.keys().find(|k| !known.contains(&k.as_str())) {
            let takes = if known.is_empty() {
                "no other field".to_string()
            } else {
                known.join(", ")
            };
            return Err(ParamError::new(
                format!("{object}.{unknown}"),
                format!("unknown field `{object}.{unknown}`: mode `{mode}` takes {takes}"),
            ));
        }
        Ok(Self { object, map })
    }

    /// `object.name`, as refusals name a field.
    pub fn param(&self, name: &str) -> String {
        format!("{}.{name}", self.object)
    }

    /// The field as sent; null counts as left out.
    pub fn value(&mut self, name: &str) -> Option<Value> {
        self.map.remove(name).filter(|v| !v.is_null())
    }

    fn typed<T>(
        &mut self,
        name: &str,
        what: &str,
        read: impl Fn(&Value) -> Option<T>,
    ) -> Result<Option<T>, ParamError> {
        self.value(name)
            .map(|v| {
                read(&v).ok_or_else(|| {
                    let param = self.param(name);
                    ParamError::new(param.clone(), format!("`{param}` must be {what}, got {v}"))
                })
            })
            .transpose()
    }

    pub fn number(&mut self, name: &str) -> Result<Option<f64>, ParamError> {
        self.typed(name, "a number", Value::as_f64)
    }

    pub fn whole(&mut self, name: &str) -> Result<Option<i64>, ParamError> {
        self.typed(name, "a whole number", Value::as_i64)
    }

    pub fn text(&mut self, name: &str) -> Result<Option<String>, ParamError> {
        self.typed(name, "a string", |v| v.as_str().map(str::to_string))
    }

    /// A number in `[lo, hi]` (`(lo, hi]` when `lo_open`), `default` when left out.
    pub fn number_in(
        &mut self,
        name: &str,
        default: f64,
        range: (f64, f64),
        lo_open: bool,
    ) -> Result<f32, ParamError> {
        let v = self.number(name)?.unwrap_or(default);
        in_range(&self.param(name), v, range, lo_open)
    }

    /// A whole number in `[lo, hi]`, `default` when left out.
    pub fn count_in(
        &mut self,
        name: &str,
        default: i64,
        (lo, hi): (i64, i64),
    ) -> Result<usize, ParamError> {
        let v = self.whole(name)?.unwrap_or(default);
        count_in(&self.param(name), v, (lo, hi))
    }

    /// One of `names`, `default` when left out.
    pub fn choice<T: Copy>(
        &mut self,
        name: &str,
        names: &[(&str, T)],
        default: T,
    ) -> Result<T, ParamError> {
        let Some(v) = self.text(name)? else {
            return Ok(default);
        };
        names
            .iter()
            .find(|(n, _)| *n == v)
            .map(|(_, x)| *x)
            .ok_or_else(|| {
                let param = self.param(name);
                let quoted: Vec<String> = names.iter().map(|(n, _)| format!("\"{n}\"")).collect();
                ParamError::new(
                    param.clone(),
                    format!("`{param}` must be {}, got {v:?}", quoted.join(" or ")),
                )
            })
    }

    /// An exit layer of the model (`required`: refused when left out).
    pub fn exit_layer(&mut self, name: &str, shape: &ModelShape) -> Result<usize, ParamError> {
        let param = self.param(name);
        let got = self.whole(name)?.ok_or_else(|| {
            ParamError::new(
                param.clone(),
                format!("`{param}` is required; available exits: {:?}", shape.exits),
            )
        })?;
        exit_layer(&param, got, shape)
    }
}

/// `got` when it is an exit of the model, else a refusal naming `param`.
pub fn exit_layer(param: &str, got: i64, shape: &ModelShape) -> Result<usize, ParamError> {
    usize::try_from(got)
        .ok()
        .filter(|l| shape.exits.contains(l))
        .ok_or_else(|| {
            ParamError::new(
                param.into(),
                format!(
                    "`{param}` = {got} is not an exit layer of this model; available exits: {:?}",
                    shape.exits
                ),
            )
        })
}

/// `v` in `[lo, hi]` (`(lo, hi]` when `lo_open`), finite, as the f32 a mode keeps.
pub fn in_range(
    param: &str,
    v: f64,
    (lo, hi): (f64, f64),
    lo_open: bool,
) -> Result<f32, ParamError> {
    let ok = v.is_finite() && (if lo_open { v > lo } else { v >= lo }) && v <= hi;
    if !ok {
        return Err(ParamError::new(
            param.into(),
            format!(
                "`{param}` must be in {}, got {v}",
                interval(lo, hi, lo_open)
            ),
        ));
    }
    Ok(v as f32)
}

/// `v` in `[lo, hi]`.
pub fn count_in(param: &str, v: i64, (lo, hi): (i64, i64)) -> Result<usize, ParamError> {
    if !(lo..=hi).contains(&v) || v < 0 {
        return Err(ParamError::new(
            param.into(),
            format!("`{param}` must be in [{lo}, {hi}], got {v}"),
        ));
    }
    Ok(v as usize)
}

/// An f32 parameter as JSON, printed as its shortest decimal (0.1, not 0.10000000149).
pub fn number(x: f32) -> Value {
    x.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

/// How the playground offers a strategy: its parameters, each with a widget and the value it
/// starts at for this model.
#[derive(Debug, Clone, Serialize)]
pub struct Form {
    /// `multi_exit.mode`.
    pub mode: &'static str,
    /// The menu's name for it.
    pub title: &'static str,
    /// One head's distribution (the original or an exit): a row of the layer view already,
    /// not a strategy an inspection reports.
    pub single_head: bool,
    pub parameters: Vec<FormField>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FormField {
    pub name: &'static str,
    pub label: &'static str,
    #[serde(flatten)]
    pub input: Input,
    pub default: Value,
}

/// A field's widget.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "input", rename_all = "snake_case")]
pub enum Input {
    /// A menu: (the value sent, its label).
    Choice {
        choices: Vec<(Value, String)>,
    },
    Number {
        min: f64,
        max: f64,
        step: f64,
    },
}

impl FormField {
    /// A menu of the model's exits (plus `extra` first: e.g. the original head).
    pub fn layers(
        name: &'static str,
        label: &'static str,
        extra: &[(Value, String)],
        layers: impl IntoIterator<Item = usize>,
        default: Value,
    ) -> Self {
        let mut choices = extra.to_vec();
        choices.extend(
            layers
                .into_iter()
                .map(|l| (Value::from(l), format!("exit {l}"))),
        );
        Self {
            name,
            label,
            input: Input::Choice { choices },
            default,
        }
    }

    pub fn choice(
        name: &'static str,
        label: &'static str,
        choices: Vec<(Value, String)>,
        default: Value,
    ) -> Self {
        Self {
            name,
            label,
            input: Input::Choice { choices },
            default,
        }
    }

    pub fn number(
        name: &'static str,
        label: &'static str,
        (min, max, step): (f64, f64, f64),
        default: f32,
    ) -> Self {
        Self {
            name,
            label,
            input: Input::Number { min, max, step },
            default: number(default),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn refusals_name_the_field() {
        let e = Fields::new(
            "multi_exit",
            "contrast",
            &["alpha"],
            fields(json!({"beta": 1})),
        )
        .unwrap_err();
        assert_eq!(e.param, "multi_exit.beta");
        assert!(e.message.contains("takes alpha"), "{}", e.message);
        let mut f = Fields::new(
            "x",
            "m",
            &["a", "b", "c"],
            fields(json!({"a": "s", "b": 1.5})),
        )
        .unwrap();
        assert_eq!(f.number("a").unwrap_err().param, "x.a");
        assert_eq!(
            f.whole("b").unwrap_err().message,
            "`x.b` must be a whole number, got 1.5"
        );
        assert_eq!(f.number("c"), Ok(None));
        let shape = ModelShape {
            num_layers: 4,
            exits: &[2, 4],
            tied_head: true,
            vocab_size: 10,
        };
        let mut f = Fields::new("o", "m", &["l", "k"], fields(json!({"l": 3, "k": null}))).unwrap();
        assert_eq!(
            f.exit_layer("l", &shape).unwrap_err().message,
            "`o.l` = 3 is not an exit layer of this model; available exits: [2, 4]"
        );
        assert_eq!(
            f.exit_layer("k", &shape).unwrap_err().message,
            "`o.k` is required; available exits: [2, 4]"
        );
        assert_eq!(
            in_range("p", 2.0, (0.0, 1.0), true).unwrap_err().message,
            "`p` must be in (0, 1], got 2"
        );
        assert!(
            count_in("p", -1, (-5, 5)).is_err(),
            "negative counts never pass"
        );
        assert_eq!(number(0.1), json!(0.1));
    }
}
