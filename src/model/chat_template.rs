//! Chat templates in Hugging Face's format: a Jinja template over `messages` that makes the
//! prompt text of a conversation, rendered with `minijinja` as transformers renders it with
//! jinja2 (`trim_blocks`, `lstrip_blocks`, Python's string methods, `raise_exception`,
//! `tojson`). Where the template comes from, first found: `--chat-template` (a file or the
//! text itself), the checkpoint's `chat_template.jinja`, the `chat_template` of its
//! `tokenizer_config.json`. The released multi-exit checkpoints are base models with none.

use std::path::Path;

use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;

use super::error::{ModelError, Result};

/// Work one rendering may do (minijinja's fuel: about one unit per instruction). A long
/// conversation through a published template takes a few thousand; a template that loops
/// without end stops here instead of holding a validation thread.
const RENDER_FUEL: u64 = 5_000_000;

/// One message of a conversation, as the template sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A conversation to render, with how to end it.
#[derive(Debug, Clone, Default)]
pub struct ChatPrompt {
    pub messages: Vec<ChatMessage>,
    /// End with the template's opening of an assistant turn (the default of a chat request).
    pub add_generation_prompt: bool,
    /// Leave the last (assistant) message open, to be continued: the text ends where its
    /// content ends (vLLM's `continue_final_message`).
    pub continue_final_message: bool,
    /// More variables for the template (`chat_template_kwargs`).
    pub kwargs: serde_json::Map<String, serde_json::Value>,
}

/// Why a conversation could not be rendered: the client's doing, a 400 on `messages`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RenderError {
    /// The template's own `raise_exception(...)`: it refuses this conversation.
    #[error("the chat template refused the messages: {0}")]
    Refused(String),
    #[error("the chat template ran out of its work budget on these messages")]
    TooMuchWork,
    #[error("cannot render the chat template: {0}")]
    Failed(String),
    #[error("`continue_final_message`: the last message's content is not at the end of the rendered conversation")]
    NotContinuable,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// Where it came from, for the start-up log.
    pub origin: String,
    source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error names `origin`.
    pub fn new(source: &str, bos_token: &str, eos_token: &str, origin: &str) -> Result<Self> {
        let mut env = Environment::new();
        // transformers' settings for chat templates.
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("the default delimiters"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_fuel(Some(RENDER_FUEL));
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, REFUSED_MARK).with_source(Refusal(msg)))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| ModelError::ChatTemplate(format!("{origin}: {e:#}")))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            origin: origin.to_string(),
            source: source.to_string(),
        })
    }

    /// The template of a checkpoint, or of `--chat-template` (`flag`: a file's path, or the
    /// template's text when it contains `{{` or `{%`). None: there is none.
    pub fn find(
        flag: Option<&str>,
        chat_template_file: Option<&Path>,
        tokenizer_config: Option<&Path>,
        fallback_special: &str,
    ) -> Result<Option<Self>> {
        let config = match tokenizer_config {
            Some(p) => Some(read_json(p)?),
            None => None,
        };
        let special = |key: &str| {
            config
                .as_ref()
                .and_then(|c| special_token_text(&c[key]))
                .unwrap_or_else(|| fallback_special.to_string())
        };
        let (bos, eos) = (special("bos_token"), special("eos_token"));
        let (source, origin) = if let Some(flag) = flag {
            if Path::new(flag).is_file() {
                (
                    read_text(Path::new(flag))?,
                    format!("--chat-template {flag}"),
                )
            } else if flag.contains("{{") || flag.contains("{%") {
                (flag.to_string(), "--chat-template (inline)".to_string())
            } else {
                return Err(ModelError::ChatTemplate(format!(
                    "--chat-template `{flag}`: no such file, and not a template (no `{{{{` or `{{%`)"
                )));
            }
        } else if let Some(p) = chat_template_file {
            (read_text(p)?, p.display().to_string())
        } else if let Some(t) = config
            .as_ref()
            .and_then(|c| config_template(&c["chat_template"]))
        {
            let p = tokenizer_config.expect("config read from it");
            (t, format!("{} (chat_template)", p.display()))
        } else {
            return Ok(None);
        };
        Self::new(&source, &bos, &eos, &origin).map(Some)
    }

    /// The template's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The prompt text of `prompt`.
    pub fn render(&self, prompt: &ChatPrompt) -> std::result::Result<String, RenderError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| RenderError::Failed(e.to_string()))?;
        let mut ctx = prompt.kwargs.clone();
        let mut set = |k: &str, v: serde_json::Value| ctx.insert(k.to_string(), v);
        set(
            "messages",
            serde_json::to_value(&prompt.messages).unwrap_or_default(),
        );
        set(
            "add_generation_prompt",
            (prompt.add_generation_prompt && !prompt.continue_final_message).into(),
        );
        set("bos_token", self.bos_token.clone().into());
        set("eos_token", self.eos_token.clone().into());
        let text = tmpl
            .render(minijinja::value::Serde(&ctx))
            .map_err(render_error)?;
        if !prompt.continue_final_message {
            return Ok(text);
        }
        // Cut after the last message's content: what the template closes a turn with goes.
        let last = prompt.messages.last().map_or("", |m| m.content.trim_end());
        match text.rfind(last) {
            Some(at) if !last.is_empty() => Ok(text[..at + last.len()].to_string()),
            _ => Err(RenderError::NotContinuable),
        }
    }
}

/// What `raise_exception` puts in the error it returns (its message rides as the source).
const REFUSED_MARK: &str = "raise_exception";

#[derive(Debug)]
struct Refusal(String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

fn render_error(e: Error) -> RenderError {
    // The refusal may be wrapped by the template's call sites: look down the chain.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<Refusal>() {
            return RenderError::Refused(r.0.clone());
        }
        source = s.source();
    }
    match e.kind() {
        ErrorKind::OutOfFuel => RenderError::TooMuchWork,
        _ => RenderError::Failed(format!("{e:#}")),
    }
}

/// A special token in `tokenizer_config.json`: a string, or an object with `content`.
fn special_token_text(v: &serde_json::Value) -> Option<String> {
    v.as_str()
        .or_else(|| v["content"].as_str())
        .map(str::to_string)
}

/// `chat_template` in `tokenizer_config.json`: a string, or a list of named templates (the
/// one named "default" is the chat template).
fn config_template(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    }
}

fn read_text(p: &Path) -> Result<String> {
    std::fs::read_to_string(p).map_err(|e| ModelError::File {
        path: p.to_path_buf(),
        message: e.to_string(),
    })
}

fn read_json(p: &Path) -> Result<serde_json::Value> {
    serde_json::from_str(&read_text(p)?).map_err(|e| ModelError::File {
        path: p.to_path_buf(),
        message: format!("invalid JSON: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            name: None,
        }
    }

    /// The shape of the published ChatML templates: a system message, turns, the
    /// generation prompt, Python's string methods and `raise_exception`.
    const CHATML: &str = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message must come first') }}{% endif %}\
{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\n' + message['content'].strip() + '<|im_end|>' + '\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn chatml() -> ChatTemplate {
        ChatTemplate::new(CHATML, "<s>", "</s>", "test").unwrap()
    }

    #[test]
    fn renders_an_hf_style_template_with_a_system_message_and_the_generation_prompt() {
        let p = ChatPrompt {
            messages: vec![msg("system", "Be brief."), msg("user", "  Hi!  ")],
            add_generation_prompt: true,
            ..Default::default()
        };
        assert_eq!(
            chatml().render(&p).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
        );
        let p = ChatPrompt {
            add_generation_prompt: false,
            ..p
        };
        assert!(chatml().render(&p).unwrap().ends_with("Hi!<|im_end|>\n"));
    }

    #[test]
    fn raise_exception_is_a_refusal_with_the_templates_message() {
        let p = ChatPrompt {
            messages: vec![msg("user", "Hi")],
            ..Default::default()
        };
        assert_eq!(
            chatml().render(&p),
            Err(RenderError::Refused(
                "a system message must come first".into()
            ))
        );
    }

    #[test]
    fn continue_final_message_leaves_the_last_turn_open() {
        let p = ChatPrompt {
            messages: vec![
                msg("system", "S"),
                msg("user", "U"),
                msg("assistant", "The answer is"),
            ],
            continue_final_message: true,
            add_generation_prompt: true,
            ..Default::default()
        };
        assert!(chatml()
            .render(&p)
            .unwrap()
            .ends_with("assistant\nThe answer is"));
    }

    #[test]
    fn the_shipped_base_template_renders_a_plain_transcript() {
        let source = include_str!("../../config/chat-template-base.jinja");
        let t = ChatTemplate::new(source, "<|endoftext|>", "<|endoftext|>", "shipped").unwrap();
        let p = ChatPrompt {
            messages: vec![
                msg("system", "You answer questions."),
                msg("user", "What is 2+2?"),
                msg("assistant", "4."),
                msg("user", "And 3+3?"),
            ],
            add_generation_prompt: true,
            ..Default::default()
        };
        assert_eq!(
            t.render(&p).unwrap(),
            "You answer questions.\n\nUser: What is 2+2?\nAssistant: 4.\nUser: And 3+3?\nAssistant:"
        );
        let tool = ChatPrompt {
            messages: vec![msg("tool", "x")],
            ..Default::default()
        };
        assert!(matches!(t.render(&tool), Err(RenderError::Refused(m)) if m.contains("tool")));
    }

    #[test]
    fn a_template_that_never_ends_runs_out_of_work() {
        let t = ChatTemplate::new(
            "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
            "",
            "",
            "loop",
        )
        .unwrap();
        assert_eq!(
            t.render(&ChatPrompt::default()),
            Err(RenderError::TooMuchWork)
        );
    }

    #[test]
    fn a_syntax_error_fails_at_start_up_naming_the_origin() {
        let e = ChatTemplate::new("{% for %}", "", "", "my.jinja").unwrap_err();
        assert!(e.to_string().contains("my.jinja"), "{e}");
    }

    #[test]
    fn finds_the_template_of_tokenizer_config_and_its_special_tokens() {
        let dir = std::env::temp_dir().join(format!("chat-tmpl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("tokenizer_config.json");
        std::fs::write(
            &cfg,
            serde_json::json!({
                "bos_token": {"content": "<B>"},
                "eos_token": "<E>",
                "chat_template": [{"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"}],
            })
            .to_string(),
        )
        .unwrap();
        let t = ChatTemplate::find(None, None, Some(&cfg), "<|endoftext|>")
            .unwrap()
            .unwrap();
        let p = ChatPrompt {
            messages: vec![msg("user", "hi")],
            ..Default::default()
        };
        assert_eq!(t.render(&p).unwrap(), "<B>hi<E>");
        // The flag wins; a value that is neither a file nor a template is an error.
        let inline = ChatTemplate::find(Some("{{ messages|length }}"), None, Some(&cfg), "")
            .unwrap()
            .unwrap();
        assert_eq!(inline.render(&p).unwrap(), "1");
        assert!(ChatTemplate::find(Some("/no/such.jinja"), None, None, "").is_err());
        // Without any: none.
        assert!(ChatTemplate::find(None, None, None, "").unwrap().is_none());
        std::fs::remove_dir_all(&dir).ok();
    }
}
