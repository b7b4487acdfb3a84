//! Engine-neutral request and event types: what the HTTP layer asks of the engine host.

use std::path::PathBuf;

use serde::Serialize;

/// What to load and how.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Name clients use in the `model` field.
    pub name: String,
    /// The GGUF file.
    pub path: PathBuf,
    /// sha256 of the file (for `/api/show` and the cache pin).
    pub sha256: String,
    /// Context window to serve; `None` uses the model's own maximum.
    pub context_length: Option<usize>,
    /// Sequences generated at once.
    pub max_seqs: usize,
    /// Reuse the KV cache of shared prompt prefixes.
    pub prefix_cache: bool,
    /// A Jinja chat template overriding the one in the GGUF.
    pub chat_template: Option<String>,
    /// The GPU (CUDA ordinal) to load onto, in builds with the `cuda` feature; `None`: the CPU.
    /// Builds without CUDA always run on the CPU.
    pub gpu: Option<u32>,
}

/// What the host knows of a loaded model.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelCard {
    pub name: String,
    pub sha256: String,
    pub file_name: String,
    pub size_bytes: u64,
    /// Tokens of context served (prompt plus completion).
    pub context_length: usize,
    /// `general.architecture` of the GGUF, e.g. `llama`.
    pub architecture: String,
    /// Quantization of the weights, e.g. `Q4_1`.
    pub quantization: String,
    pub parameter_count: Option<u64>,
    pub max_seqs: usize,
    /// Unix seconds when loading finished.
    pub loaded_at: i64,
    /// Seconds loading took.
    pub load_seconds: f64,
}

/// One chat message, already flattened to text.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTurn {
    pub role: String,
    pub content: String,
    /// Tool calls an assistant message made (OpenAI JSON), passed back to the template.
    pub tool_calls: Option<serde_json::Value>,
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

/// The input of a generation.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Chat {
        messages: Vec<ChatTurn>,
        /// OpenAI tool definitions.
        tools: Option<Vec<serde_json::Value>>,
        /// OpenAI `tool_choice`.
        tool_choice: Option<serde_json::Value>,
    },
    Text(String),
}

/// Constrained output.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON matching this schema.
    JsonSchema(serde_json::Value),
}

/// Sampling and stopping.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub max_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub min_p: Option<f64>,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub format: OutputFormat,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            max_tokens: None,
            temperature: None,
            top_p: None,
            top_k: None,
            min_p: None,
            stop: Vec::new(),
            seed: None,
            presence_penalty: None,
            frequency_penalty: None,
            repeat_penalty: None,
            format: OutputFormat::Text,
        }
    }
}

/// Why a generation ended, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
    ToolCalls,
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::Abort => "abort",
        }
    }
}

/// A tool call the model made.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// JSON text of the arguments.
    pub arguments: String,
}

/// Token counts of one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// What a generation produces, in order: text deltas, then one `Finished`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Delta {
        text: String,
        tool_calls: Vec<ToolCall>,
    },
    Finished {
        reason: FinishReason,
        usage: Usage,
    },
}
