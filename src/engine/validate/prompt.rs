//! Prompts (text or token ids, tokenized here), stop sequences, and whether a prompt could
//! ever fit the batch budget.

use super::{ValidationError, Validator};
use crate::engine::request::PromptInput;
use crate::engine::scheduler::{self, Demand, Refusal};
use crate::model::ChatPrompt;

impl Validator {
    /// The fewest tokens `text` can have: each covers at most the longest token's bytes, so
    /// a text is refused from its length alone, before it is tokenized.
    pub fn tokens_at_least(&self, text: &str) -> usize {
        text.len().div_ceil(self.limits.max_token_bytes.max(1))
    }

    /// The prompt text of a conversation, by the chat template.
    pub fn render_chat(&self, chat: &ChatPrompt) -> Result<String, ValidationError> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or(ValidationError::NoChatTemplate)?;
        template.render(chat).map_err(ValidationError::ChatTemplate)
    }

    /// `id` as a token of the vocabulary, if it is one.
    pub fn token_id(&self, id: i64) -> Option<u32> {
        u32::try_from(id)
            .ok()
            .filter(|&i| (i as usize) < self.limits.vocab_size)
    }

    /// Refuses a prompt whose `copies` sequences of `prompt_len + max_tokens` positions could
    /// never fit the batch budget, naming `copies_param` or `tokens_param` and both numbers.
    pub(super) fn fits_alone(
        &self,
        prompt_len: usize,
        max_tokens: usize,
        copies: usize,
        copies_param: &'static str,
        tokens_param: &'static str,
    ) -> Result<(), ValidationError> {
        let demand = Demand::of_prompt(prompt_len, max_tokens, copies)
            .ok_or(ValidationError::TooLarge(tokens_param))?;
        match scheduler::fits_alone(&self.limits.budget, demand) {
            Ok(()) => Ok(()),
            Err(Refusal::Sequences { need, limit }) => Err(ValidationError::BatchSequences {
                param: copies_param,
                need,
                limit,
            }),
            Err(Refusal::Tokens { need, limit }) => Err(ValidationError::BatchTokens {
                param: tokens_param,
                prompt: prompt_len,
                max_tokens,
                copies,
                need,
                limit,
            }),
        }
    }

    /// At most `--max-stop-sequences`, none empty, each at most `--max-stop-length` chars.
    pub(super) fn stops(&self, stops: &[String]) -> Result<(), ValidationError> {
        let l = &*self.limits;
        if stops.len() > l.max_stop_sequences {
            return Err(ValidationError::TooManyStops {
                max: l.max_stop_sequences,
                got: stops.len(),
            });
        }
        for s in stops {
            if s.is_empty() {
                return Err(ValidationError::EmptyStop);
            }
            // A cheap bound first: characters never outnumber bytes.
            if s.len() > l.max_stop_length && s.chars().count() > l.max_stop_length {
                return Err(ValidationError::StopTooLong {
                    max: l.max_stop_length,
                    got: s.chars().count(),
                });
            }
        }
        Ok(())
    }

    /// Each prompt as token ids, at most `--max-input-tokens` of them; a text that cannot
    /// fit is refused from its length alone, before it is tokenized.
    pub(super) fn prompts(&self, inputs: &[PromptInput]) -> Result<Vec<Vec<u32>>, ValidationError> {
        if inputs.is_empty() {
            return Err(ValidationError::EmptyPromptList);
        }
        inputs.iter().map(|p| self.prompt_ids(p)).collect()
    }

    /// One prompt's token ids. A conversation is its rendered text, checked as any text is,
    /// with the refusals naming `messages`.
    fn prompt_ids(&self, p: &PromptInput) -> Result<Vec<u32>, ValidationError> {
        let l = &*self.limits;
        let too_long = |tokens, bytes| ValidationError::PromptTooLong {
            tokens,
            bytes,
            max: l.max_input_tokens,
        };
        let ids = match p {
            PromptInput::Chat(chat) => {
                let text = PromptInput::Text(self.render_chat(chat)?);
                return self.prompt_ids(&text).map_err(|e| match e {
                    ValidationError::PromptTooLong { tokens, max, .. } => {
                        ValidationError::MessagesTooLong { tokens, max }
                    }
                    ValidationError::EmptyPrompt => ValidationError::EmptyChatPrompt,
                    other => other,
                });
            }
            PromptInput::Text(text) => {
                let at_least = self.tokens_at_least(text);
                if at_least > l.max_input_tokens {
                    return Err(too_long(at_least, Some(text.len())));
                }
                self.tokenizer
                    .encode(text)
                    .map_err(|e| ValidationError::Untokenizable(e.to_string()))?
            }
            PromptInput::Tokens(ids) if ids.len() > l.max_input_tokens => {
                return Err(too_long(ids.len(), None))
            }
            PromptInput::Tokens(ids) => ids
                .iter()
                .map(|&id| {
                    self.token_id(id).ok_or(ValidationError::PromptTokenId {
                        vocab: l.vocab_size,
                        got: id,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        if ids.is_empty() {
            return Err(ValidationError::EmptyPrompt);
        }
        if ids.len() > l.max_input_tokens {
            return Err(too_long(ids.len(), None));
        }
        Ok(ids)
    }
}
