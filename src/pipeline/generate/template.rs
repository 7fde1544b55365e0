//! The chat template: how a conversation becomes a prompt, for text and
//! vision-language models alike. One mechanism: the model's own Jinja
//! template (what transformers' `apply_chat_template` runs, Python's string
//! methods included), read from a `.jinja` file or from the `chat_template`
//! string of a JSON file (`chat_template.json`, `tokenizer_config.json`).
//! models.json's older inline form (a pattern per role) is turned into an
//! equivalent Jinja template, so it renders through the same code.
//!
//! Roles: `system`, `developer` (OpenAI's newer name for it, rendered as
//! `system`), `user` and `assistant`; any other is a bad request before the
//! template runs.

use crate::error::InferError;
use crate::job::ChatMessage;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// models.json `generation.chat_template`: the model's Jinja template (a
/// file, relative to models.json), or the older inline patterns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ChatTemplateSpec {
    File(PathBuf),
    Patterns(ChatPatterns),
}

/// The inline form: each message is its role's pattern with `{content}`
/// filled in, then `generation_prompt` opens the answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatPatterns {
    pub system: String,
    pub user: String,
    pub assistant: String,
    pub generation_prompt: String,
    /// Stop strings every chat request gets (the next turn's opening).
    pub stop: Vec<String>,
    /// A system message put first when a conversation starts without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_system: Option<String>,
}

impl Default for ChatPatterns {
    /// The template of a model whose models.json names none.
    fn default() -> Self {
        ChatPatterns {
            system: "{content}\n".into(),
            user: "User: {content}\n".into(),
            assistant: "Assistant: {content}\n".into(),
            generation_prompt: "Assistant:".into(),
            stop: vec!["\nUser:".into()],
            default_system: None,
        }
    }
}

impl ChatPatterns {
    /// The same template in Jinja (every literal an escaped string, so the
    /// patterns' own text is never read as Jinja).
    pub fn to_jinja(&self) -> String {
        let lit = |s: &str| format!("{{{{ {} }}}}", serde_json::to_string(s).expect("a string serialises"));
        let fill = |pattern: &str, value: &str| match pattern.split_once("{content}") {
            Some((before, after)) => format!("{}{{{{ {value} }}}}{}", lit(before), lit(after)),
            None => lit(pattern),
        };
        let mut t = String::new();
        if let Some(system) = &self.default_system {
            t += &format!(
                "{{% if not messages or messages[0]['role'] != 'system' %}}{}{{% endif %}}",
                fill(&self.system, &serde_json::to_string(system).expect("a string serialises"))
            );
        }
        t += "{% for message in messages %}";
        t += &format!("{{% if message['role'] == 'system' %}}{}", fill(&self.system, "message['content']"));
        t += &format!("{{% elif message['role'] == 'user' %}}{}", fill(&self.user, "message['content']"));
        t += &format!("{{% elif message['role'] == 'assistant' %}}{}", fill(&self.assistant, "message['content']"));
        t += "{% endif %}{% endfor %}";
        t += &format!("{{% if add_generation_prompt %}}{}{{% endif %}}", lit(&self.generation_prompt));
        t
    }
}

/// Reads a template file: Jinja, or JSON with a `chat_template` string.
pub fn read_template_file(path: &Path) -> Result<String, InferError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| InferError::unavailable(format!("cannot read the chat template {}: {e}", path.display())))?;
    if path.extension().is_none_or(|e| e != "json") {
        return Ok(text);
    }
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| InferError::unavailable(format!("the chat template {} is not JSON: {e}", path.display())))?;
    match value.get("chat_template") {
        Some(serde_json::Value::String(t)) => Ok(t.clone()),
        _ => Err(InferError::unavailable(format!("{} has no \"chat_template\" string", path.display()))),
    }
}

/// How a message's content reaches the template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// A string (text models' templates concatenate it).
    Text,
    /// A list of parts, `{"type": "text", "text": …}` and `{"type": "image"}`
    /// where each image stood, as transformers' processors pass them.
    Parts,
}

/// A compiled chat template and the stop strings that go with it.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    /// Stop strings every chat request gets.
    pub stop: Vec<String>,
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`; refused (with the template's error) when it is not Jinja.
    pub fn new(source: String, stop: Vec<String>) -> Result<ChatTemplate, InferError> {
        let mut env = minijinja::Environment::new();
        // Templates are written for Python's Jinja: its string methods work as there.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // Hugging Face templates call raise_exception to refuse a conversation.
        env.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned(NAME, source)
            .map_err(|e| InferError::unavailable(format!("the chat template is not valid Jinja: {e}")))?;
        Ok(ChatTemplate { env, stop })
    }

    /// The template models.json names (`spec`, files relative to `dir`;
    /// none: the plain default), with `stop` given or the inline form's.
    pub fn load(spec: Option<&ChatTemplateSpec>, stop: Option<&[String]>, dir: &Path) -> Result<Self, InferError> {
        let (source, own_stop) = match spec {
            Some(ChatTemplateSpec::File(path)) => (read_template_file(&dir.join(path))?, Vec::new()),
            Some(ChatTemplateSpec::Patterns(p)) => (p.to_jinja(), p.stop.clone()),
            None => {
                let p = ChatPatterns::default();
                (p.to_jinja(), p.stop)
            }
        };
        let stop = stop.map_or(own_stop, <[String]>::to_vec);
        ChatTemplate::new(source, stop)
    }

    /// The prompt of `messages` with the answer's opening, their content
    /// given to the template as `content` says.
    pub fn render(&self, messages: &[ChatMessage], content: Content) -> Result<String, InferError> {
        let mut rendered = Vec::with_capacity(messages.len());
        for m in messages {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                r @ ("user" | "assistant") => r,
                other => {
                    return Err(InferError::bad_input(format!(
                        "unknown chat role '{other}' (system, user or assistant)"
                    )));
                }
            };
            let value = match content {
                Content::Text => serde_json::Value::String(m.content.clone()),
                Content::Parts => serde_json::Value::Array(parts(m)),
            };
            rendered.push(serde_json::json!({"role": role, "content": value}));
        }
        let ctx = minijinja::context! { messages => rendered, add_generation_prompt => true };
        let template = self.env.get_template(NAME).map_err(|e| InferError::internal(e.to_string()))?;
        template
            .render(ctx)
            .map_err(|e| InferError::bad_input(format!("the chat template cannot render these messages: {e}")))
    }
}

/// A message's text and images as content parts, in the order they came.
fn parts(m: &ChatMessage) -> Vec<serde_json::Value> {
    let mut parts = Vec::new();
    let mut at = 0;
    for (offset, _) in &m.images {
        let offset = (*offset).min(m.content.len());
        if offset > at {
            parts.push(serde_json::json!({"type": "text", "text": &m.content[at..offset]}));
        }
        parts.push(serde_json::json!({"type": "image"}));
        at = offset.max(at);
    }
    if at < m.content.len() || parts.is_empty() {
        parts.push(serde_json::json!({"type": "text", "text": &m.content[at..]}));
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into(), images: Vec::new() }
    }

    fn patterns(p: ChatPatterns) -> ChatTemplate {
        let stop = p.stop.clone();
        ChatTemplate::new(p.to_jinja(), stop).unwrap()
    }

    #[test]
    fn chat_messages_render_through_the_template() {
        let t = patterns(ChatPatterns::default());
        let prompt = t.render(
            &[m("system", "Be brief."), m("user", "Hi"), m("assistant", "Hello."), m("user", "2+2?")],
            Content::Text,
        );
        assert_eq!(prompt.unwrap(), "Be brief.\nUser: Hi\nAssistant: Hello.\nUser: 2+2?\nAssistant:");
        assert!(t.render(&[m("robot", "x")], Content::Text).unwrap_err().message.contains("unknown chat role"));
        let with_default = patterns(ChatPatterns { default_system: Some("Be kind.".into()), ..Default::default() });
        assert_eq!(with_default.render(&[m("user", "Hi")], Content::Text).unwrap(), "Be kind.\nUser: Hi\nAssistant:");
        assert_eq!(
            with_default.render(&[m("system", "Be brief."), m("user", "Hi")], Content::Text).unwrap(),
            "Be brief.\nUser: Hi\nAssistant:"
        );
        assert_eq!(
            with_default.render(&[m("developer", "Be brief."), m("user", "Hi")], Content::Text).unwrap(),
            "Be brief.\nUser: Hi\nAssistant:"
        );
    }

    #[test]
    fn pattern_text_is_never_read_as_jinja() {
        let odd = ChatPatterns {
            user: "{{ x }} {% raw %}\"quoted\" \\ {content}\u{1}\n".into(),
            generation_prompt: "{# #}".into(),
            ..Default::default()
        };
        let t = patterns(odd);
        assert_eq!(
            t.render(&[m("user", "{{ 7*7 }}")], Content::Text).unwrap(),
            "{{ x }} {% raw %}\"quoted\" \\ {{ 7*7 }}\u{1}\n{# #}"
        );
    }

    #[test]
    fn the_models_own_chatml_template_renders_as_its_patterns_do() {
        // SmolLM2's template as its GGUF carries it (tokenizer.chat_template), newlines inside its strings.
        let chatml = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let jinja = ChatTemplate::new(chatml.into(), Vec::new()).unwrap();
        let inline = patterns(ChatPatterns {
            system: "<|im_start|>system\n{content}<|im_end|>\n".into(),
            user: "<|im_start|>user\n{content}<|im_end|>\n".into(),
            assistant: "<|im_start|>assistant\n{content}<|im_end|>\n".into(),
            generation_prompt: "<|im_start|>assistant\n".into(),
            stop: vec!["<|im_start|>".into()],
            default_system: Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face".into()),
        });
        for chat in [
            vec![m("user", "What is the capital of France?")],
            vec![m("system", "Be brief."), m("user", "Hi"), m("assistant", "Hello."), m("user", "And?")],
            vec![m("developer", "Be brief."), m("user", "Hi")],
        ] {
            assert_eq!(jinja.render(&chat, Content::Text).unwrap(), inline.render(&chat, Content::Text).unwrap());
        }
    }

    #[test]
    fn templates_written_for_python_jinja_render_and_bad_ones_are_refused() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m['content'].strip().upper() }}{% endfor %}".into(),
            Vec::new(),
        )
        .unwrap();
        assert_eq!(t.render(&[m("user", "  hi ")], Content::Text).unwrap(), "HI");
        let refuse = ChatTemplate::new("{{ raise_exception('no system messages') }}".into(), Vec::new()).unwrap();
        assert!(refuse.render(&[m("user", "x")], Content::Text).unwrap_err().message.contains("no system messages"));
        assert!(ChatTemplate::new("{% for %}".into(), Vec::new()).is_err());
    }

    #[test]
    fn images_become_parts_where_they_stood() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endfor %}".into(),
            Vec::new(),
        )
        .unwrap();
        let msg = ChatMessage { role: "user".into(), content: "ab".into(), images: vec![(0, vec![]), (1, vec![])] };
        assert_eq!(t.render(&[msg], Content::Parts).unwrap(), "<image>a<image>b");
    }
}
