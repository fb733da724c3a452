//! Text in and out of token ids, built from the model's own GGUF metadata.
//!
//! [`TextCodec`] pairs a `tokenizers` byte-level BPE (vocabulary and merges from
//! `tokenizer.ggml.*`, the pre-tokenizer named by `tokenizer.ggml.pre`) with the model's chat
//! template (`tokenizer.chat_template`, rendered by minijinja). Variants only ever see the ids.

use std::collections::HashMap;

use plugin_api::{MetaValue, ModelView};
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::{digits::Digits, sequence::Sequence, PreTokenizerWrapper};
use tokenizers::{AddedToken, Tokenizer};

/// Why the model's tokenizer or chat template could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("the model has no {0} metadata, so autoinfer cannot build its tokenizer")]
    Missing(&'static str),
    #[error("tokenizer model {0:?} is not supported (only byte-level BPE, \"gpt2\")")]
    Model(String),
    #[error("pre-tokenizer {0:?} is not supported (known: smollm, gpt2, default)")]
    PreTokenizer(String),
    #[error("merge #{index} {merge:?} is not two space-separated tokens")]
    Merge { index: usize, merge: String },
    #[error("building the BPE tokenizer failed: {0}")]
    Build(String),
    #[error("tokenizing failed: {0}")]
    Encode(String),
    #[error("the chat template does not render: {0}")]
    Template(#[from] minijinja::Error),
}

/// The chat template's name in the minijinja environment.
const CHAT: &str = "chat";

/// GGUF `tokenizer.ggml.token_type` values that mark special (control) tokens.
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The model's tokenizer and chat template.
pub struct TextCodec {
    tokenizer: Tokenizer,
    /// The chat template, parsed once (a syntax error surfaces when the model is opened).
    templates: minijinja::Environment<'static>,
    bos: String,
    /// Id of the end-of-sequence token.
    pub eos_id: u32,
    /// Number of entries in the vocabulary; every valid id is below it.
    pub vocab_size: u32,
}

fn strings<'a>(view: &'a ModelView, key: &'static str) -> Result<Vec<&'a str>, TokenizeError> {
    match view.meta(key) {
        Some(MetaValue::StrArray(items)) => Ok(items.iter().map(|s| s.as_str()).collect()),
        _ => Err(TokenizeError::Missing(key)),
    }
}

impl TextCodec {
    /// Builds the tokenizer and template from the model's metadata.
    pub fn from_model(view: &ModelView) -> Result<Self, TokenizeError> {
        let model = view
            .meta_str("tokenizer.ggml.model")
            .ok_or(TokenizeError::Missing("tokenizer.ggml.model"))?;
        if model != "gpt2" {
            return Err(TokenizeError::Model(model.to_string()));
        }
        let tokens = strings(view, "tokenizer.ggml.tokens")?;
        let merges = strings(view, "tokenizer.ggml.merges")?
            .into_iter()
            .enumerate()
            .map(|(index, m)| match m.split_once(' ') {
                Some((a, b)) if !a.is_empty() && !b.is_empty() => {
                    Ok((a.to_string(), b.to_string()))
                }
                _ => Err(TokenizeError::Merge {
                    index,
                    merge: m.to_string(),
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| TokenizeError::Build(e.to_string()))?;

        let pre = view.meta_str("tokenizer.ggml.pre").unwrap_or("default");
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            // llama.cpp's "smollm": every digit on its own, then the GPT-2 split.
            "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
            "gpt2" | "default" => byte_level.into(),
            other => return Err(TokenizeError::PreTokenizer(other.to_string())),
        };
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        tokenizer.with_decoder(Some(ByteLevel::default()));

        let types = match view.meta("tokenizer.ggml.token_type") {
            Some(MetaValue::IntArray(t)) => t.to_vec(),
            _ => Vec::new(),
        };
        let special: Vec<AddedToken> = types
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
            .filter_map(|(i, _)| tokens.get(i))
            .map(|t| AddedToken::from(t.to_string(), true).normalized(false))
            .collect();
        tokenizer
            .add_special_tokens(special)
            .map_err(|e| TokenizeError::Build(e.to_string()))?;

        let token_at = |key: &'static str| -> Result<(u32, String), TokenizeError> {
            let id = view.meta_uint(key).ok_or(TokenizeError::Missing(key))? as u32;
            let text = tokens.get(id as usize).ok_or(TokenizeError::Missing(key))?;
            Ok((id, text.to_string()))
        };
        let (eos_id, _) = token_at("tokenizer.ggml.eos_token_id")?;
        let (_, bos) = token_at("tokenizer.ggml.bos_token_id")?;
        let chat_template = view
            .meta_str("tokenizer.chat_template")
            .ok_or(TokenizeError::Missing("tokenizer.chat_template"))?
            .to_string();
        let mut templates = minijinja::Environment::new();
        templates.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        templates.add_template_owned(CHAT, chat_template)?;
        Ok(TextCodec {
            tokenizer,
            templates,
            bos,
            eos_id,
            vocab_size: tokens.len() as u32,
        })
    }

    /// Token ids of `text`; special tokens written in the text (`<|im_start|>`) are parsed.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        let encoding = self
            .tokenizer
            .encode_fast(text, false)
            .map_err(|e| TokenizeError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizeError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| TokenizeError::Encode(e.to_string()))
    }

    /// Renders a one-turn chat (the user's message, then the assistant's turn begins).
    pub fn render_chat(&self, user_message: &str) -> Result<String, TokenizeError> {
        let messages = [HashMap::from([("role", "user"), ("content", user_message)])];
        let text = self
            .templates
            .get_template(CHAT)?
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos,
            })?;
        Ok(text)
    }
}
