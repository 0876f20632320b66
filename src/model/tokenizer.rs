//! The GPT-2 byte-level BPE tokenizer, and incremental detokenization for streaming.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::Tokenizer;

use super::error::{ModelError, Result};
use super::source::TokenizerFiles;

pub struct TextTokenizer {
    inner: Tokenizer,
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl TextTokenizer {
    pub fn from_files(files: &TokenizerFiles) -> Result<Self> {
        let inner = match files {
            TokenizerFiles::Json(path) => Tokenizer::from_file(path)
                .map_err(|e| tok_err(format!("{}: {e}", path.display())))?,
            TokenizerFiles::VocabMerges { vocab, merges } => {
                let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
                    .build()
                    .map_err(|e| tok_err(format!("{}: {e}", vocab.display())))?;
                let mut t = Tokenizer::new(bpe);
                // GPT-2: no prefix space, regex split; the decoder maps bytes back.
                t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
                t.with_decoder(Some(ByteLevelDecoder::default()));
                t
            }
        };
        Ok(Self { inner })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text; an incomplete UTF-8 sequence at the end becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tok_err)
    }

    /// Bytes of text the longest token stands for (a lone byte of a multi-byte character
    /// decodes to U+FFFD, 3 bytes: an over-estimate, the safe side for a bound).
    pub fn max_token_bytes(&self) -> usize {
        (0..self.inner.get_vocab_size(true) as u32)
            .filter_map(|id| self.decode(&[id]).ok())
            .map(|t| t.len())
            .max()
            .unwrap_or(1)
            .max(1)
    }

    /// The tokenizer in `tokenizer.json`'s form (whichever files it was built from).
    pub fn to_json(&self) -> Result<serde_json::Value> {
        let text = self.inner.to_string(false).map_err(tok_err)?;
        serde_json::from_str(&text).map_err(tok_err)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// A UTF-8 character has at most 4 bytes, so byte-level BPE completes one within 4 tokens.
const MAX_HELD_IDS: usize = 4;

/// Turns a growing list of ids into text deltas that never split a UTF-8 character: a token
/// that ends inside a multi-byte character is held back until the character is complete.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the ids re-decoded for context (byte-level BPE needs none, but a window
    /// keeps the decoder right for tokenizers whose output depends on neighbours).
    prefix_offset: usize,
    /// Ids before this one have been emitted as text.
    read_offset: usize,
}

impl IncrementalDecoder {
    /// Adds `id` and returns the text that became complete (possibly empty).
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        // Held ids are at most one character's bytes; more means the model produced invalid
        // UTF-8, which is emitted (as U+FFFD) rather than re-decoded at every later token.
        let stuck = self.ids.len() - self.read_offset > MAX_HELD_IDS;
        if full.len() > prefix.len()
            && (stuck || !full.ends_with('\u{FFFD}'))
            && full.is_char_boundary(prefix.len())
        {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }

    /// The text of ids still held back (at the end of generation, emitted as is).
    pub fn flush(&mut self, tok: &TextTokenizer) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}
