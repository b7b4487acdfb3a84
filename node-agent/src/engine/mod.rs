//! Engine host: loads GGUF files into mistral.rs and runs generations.
//!
//! Each loaded model gets its own `MistralRs` instance (its own engine thread and scheduler),
//! so loading or unloading one model never pauses another. Weights are loaded from a local
//! path only: the puller has already fetched and verified them, and mistral.rs is never given a
//! chance to reach a model hub.

pub mod gguf;
pub mod types;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use candle_core::Device;
use either::Either;
use indexmap::IndexMap;
use mistralrs_core::{
    AdapterPaths, Constraint, DefaultSchedulerMethod, DeviceMapSetting, GGUFLoaderBuilder,
    GGUFSpecificConfig, LocalModelPaths, MistralRs, MistralRsBuilder, ModelDType, ModelPaths,
    NormalRequest, Request, RequestMessage, Response, SamplingParams, SchedulerConfig, StopTokens,
    TokenizationRequest, Tool, ToolChoice,
};
use tokio::sync::mpsc;

use self::types::{
    ChatTurn, Event, FinishReason, LoadSpec, ModelCard, OutputFormat, Prompt, Sampling, ToolCall,
    Usage,
};
use crate::api::admission::Admission;

/// Errors of the engine host.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model `{0}` is not loaded")]
    NotLoaded(String),
    #[error("model `{0}` is already loaded")]
    AlreadyLoaded(String),
    #[error("cannot read the model file {path}: {message}")]
    BadFile { path: String, message: String },
    #[error("unsupported model architecture `{0}`")]
    UnsupportedArchitecture(String),
    #[error("loading `{model}` failed: {message}")]
    Load { model: String, message: String },
    #[error("{0}")]
    Validation(String),
    #[error("engine error: {0}")]
    Internal(String),
}

impl EngineError {
    /// Short reason for status and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            EngineError::UnsupportedArchitecture(_) => "UnsupportedArchitecture",
            EngineError::BadFile { .. } => "InvalidModelFile",
            EngineError::Load { .. } => "LoadFailed",
            _ => "EngineError",
        }
    }
}

/// Architectures the GGUF loader of mistral.rs 0.8.1 implements.
pub const SUPPORTED_GGUF_ARCHITECTURES: &[&str] = &[
    "llama",
    "mistral3",
    "phi2",
    "phi3",
    "starcoder2",
    "qwen2",
    "qwen3",
    "qwen3moe",
];

/// How the host runs models.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Requests that may wait per model beyond those running.
    pub max_queue: usize,
    /// Seconds in-flight requests get to finish when a model is unloaded.
    pub drain: Duration,
    /// Directory for files the engine needs beside the weights (chat templates).
    pub work_dir: std::path::PathBuf,
}

/// A model loaded and serving.
pub struct LoadedModel {
    pub card: ModelCard,
    pub admission: Admission,
    runner: Arc<MistralRs>,
    /// Bytes of memory the model took when loaded (resident set growth on CPU).
    pub memory_bytes: u64,
}

/// All models of this process.
pub struct EngineHost {
    cfg: EngineConfig,
    models: RwLock<HashMap<String, Arc<LoadedModel>>>,
}

/// The device a model loads onto: GPU `gpu` when built with CUDA, else the CPU.
fn device(gpu: Option<u32>) -> Result<Device, EngineError> {
    #[cfg(feature = "cuda")]
    {
        match gpu {
            Some(i) => Device::cuda_if_available(i as usize)
                .map_err(|e| EngineError::Internal(format!("CUDA device {i}: {e}"))),
            None => Ok(Device::Cpu),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = gpu;
        Ok(Device::Cpu)
    }
}

/// Resident set size of this process, in bytes (Linux), used to measure a CPU load's footprint.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

impl EngineHost {
    pub fn new(cfg: EngineConfig) -> Self {
        Self {
            cfg,
            models: RwLock::new(HashMap::new()),
        }
    }

    /// A loaded model by served name.
    pub fn get(&self, name: &str) -> Option<Arc<LoadedModel>> {
        self.models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Cards of every loaded model, by name.
    pub fn models(&self) -> Vec<ModelCard> {
        let mut v: Vec<ModelCard> = self
            .models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|m| m.card.clone())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Accelerator memory a model holds (0 on CPU).
    pub fn vram_bytes(&self, card: &ModelCard) -> u64 {
        if cfg!(feature = "cuda") {
            self.get(&card.name).map(|m| m.memory_bytes).unwrap_or(0)
        } else {
            0
        }
    }

    /// Loads a GGUF file. Blocks a worker thread while the weights are read.
    pub async fn load(&self, spec: LoadSpec) -> Result<Arc<LoadedModel>, EngineError> {
        if self.get(&spec.name).is_some() {
            return Err(EngineError::AlreadyLoaded(spec.name));
        }
        let started = Instant::now();
        let header = {
            let path = spec.path.clone();
            tokio::task::spawn_blocking(move || gguf::read_header(&path))
                .await
                .map_err(|e| EngineError::Internal(e.to_string()))??
        };
        if !SUPPORTED_GGUF_ARCHITECTURES.contains(&header.architecture.as_str()) {
            return Err(EngineError::UnsupportedArchitecture(header.architecture));
        }
        let context_length = match (spec.context_length, header.context_length) {
            (Some(asked), Some(max)) if asked > max => {
                tracing::warn!(model = %spec.name, asked, max,
                    "contextLength exceeds what the model was trained for; serving the model's maximum");
                max
            }
            (Some(asked), _) => asked,
            (None, Some(max)) => max,
            (None, None) => 2048,
        };
        let chat_template = match &spec.chat_template {
            Some(t) => Some(self.write_template(&spec.name, t)?),
            None => None,
        };
        let dir = spec
            .path
            .parent()
            .ok_or_else(|| EngineError::BadFile {
                path: spec.path.display().to_string(),
                message: "has no parent directory".into(),
            })?
            .to_string_lossy()
            .to_string();
        let file = spec
            .path
            .file_name()
            .and_then(|f| f.to_str())
            .ok_or_else(|| EngineError::BadFile {
                path: spec.path.display().to_string(),
                message: "file name is not UTF-8".into(),
            })?
            .to_string();
        let rss_before = rss_bytes();
        let name = spec.name.clone();
        let max_seqs = spec.max_seqs.max(1);
        let gpu = spec.gpu;
        let pipeline = tokio::task::spawn_blocking(move || {
            let loader = GGUFLoaderBuilder::new(
                None,
                None,
                dir.clone(),
                vec![file.clone()],
                GGUFSpecificConfig::default(),
                false,
                chat_template,
            )
            .build();
            // Local paths only: the tokenizer and chat template come from the GGUF itself, and
            // no hub client is ever built.
            let paths: Box<dyn ModelPaths> = Box::new(LocalModelPaths {
                tokenizer_filename: PathBuf::new(),
                config_filename: PathBuf::new(),
                template_filename: None,
                filenames: vec![PathBuf::from(&dir).join(&file)],
                adapter_paths: AdapterPaths::None,
                gen_conf: None,
                preprocessor_config: None,
                processor_config: None,
                chat_template_json_filename: None,
            });
            loader
                .load_model_from_path(
                    &paths,
                    &ModelDType::F32,
                    &device(gpu)?,
                    true,
                    DeviceMapSetting::dummy(),
                    None,
                    None,
                )
                .map_err(|e| EngineError::Load {
                    model: name.clone(),
                    message: format!("{e:#}"),
                })
        })
        .await
        .map_err(|e| EngineError::Internal(format!("load task: {e}")))??;
        let sched = SchedulerConfig::DefaultScheduler {
            method: DefaultSchedulerMethod::Fixed(max_seqs.try_into().map_err(|_| {
                EngineError::Validation("maxConcurrentSequences must be at least 1".into())
            })?),
        };
        let runner = MistralRsBuilder::new(pipeline, sched, false, None)
            .with_model_id(spec.name.clone())
            .with_no_prefix_cache(!spec.prefix_cache)
            .with_prefix_cache_n(16)
            .build()
            .await;
        let load_seconds = started.elapsed().as_secs_f64();
        let memory_bytes = rss_bytes().saturating_sub(rss_before);
        let size_bytes = std::fs::metadata(&spec.path).map(|m| m.len()).unwrap_or(0);
        let card = ModelCard {
            name: spec.name.clone(),
            sha256: spec.sha256.clone(),
            file_name: spec
                .path
                .file_name()
                .map(|f| f.to_string_lossy().to_string())
                .unwrap_or_default(),
            size_bytes,
            context_length,
            architecture: header.architecture.clone(),
            quantization: header.quantization.clone(),
            parameter_count: Some(header.parameter_count),
            max_seqs,
            loaded_at: chrono::Utc::now().timestamp(),
            load_seconds,
        };
        let loaded = Arc::new(LoadedModel {
            admission: Admission::new(&spec.name, max_seqs, self.cfg.max_queue),
            card,
            runner,
            memory_bytes,
        });
        self.models
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(spec.name.clone(), loaded.clone());
        tracing::info!(model = %spec.name, arch = %header.architecture, quant = %header.quantization,
            context_length, load_seconds = format!("{load_seconds:.1}"), memory_bytes, "model loaded");
        Ok(loaded)
    }

    fn write_template(&self, name: &str, template: &str) -> Result<String, EngineError> {
        let dir = self.cfg.work_dir.join("templates");
        std::fs::create_dir_all(&dir).map_err(|e| EngineError::Internal(e.to_string()))?;
        let safe: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let path = dir.join(format!("{safe}.jinja"));
        std::fs::write(&path, template).map_err(|e| EngineError::Internal(e.to_string()))?;
        Ok(path.to_string_lossy().to_string())
    }

    /// Stops admitting requests to `name`, lets in-flight ones finish (bounded), then frees it.
    pub async fn unload(&self, name: &str) -> Result<(), EngineError> {
        let Some(model) = self
            .models
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
        else {
            return Err(EngineError::NotLoaded(name.to_string()));
        };
        let drained = model
            .admission
            .drain(model.card.max_seqs, self.cfg.drain)
            .await;
        if !drained {
            tracing::warn!(
                model = name,
                "unloading with requests still running after the drain deadline"
            );
        }
        if let Ok(sender) = model.runner.get_sender(None) {
            let _ = sender.send(Request::Terminate).await;
        }
        tracing::info!(model = name, "model unloaded");
        Ok(())
    }

    /// Tokens the prompt takes once the chat template is applied.
    pub async fn count_prompt_tokens(
        &self,
        model: &LoadedModel,
        prompt: &Prompt,
    ) -> Result<usize, EngineError> {
        let (text, tools) = match prompt {
            Prompt::Chat {
                messages, tools, ..
            } => (Either::Left(chat_messages(messages)), convert_tools(tools)?),
            Prompt::Text(t) => (Either::Right(t.clone()), None),
        };
        let sender = self.sender(model)?;
        let name = model.card.name.clone();
        // The engine panics if the answer channel closes before it replies, so a task owns
        // the channel until the answer arrives, even when the client has gone.
        let task = tokio::spawn(async move {
            let (tx, mut rx) = mpsc::channel(1);
            let req = Request::Tokenize(TokenizationRequest {
                text,
                tools,
                add_generation_prompt: true,
                add_special_tokens: true,
                enable_thinking: None,
                reasoning_effort: None,
                response: tx,
            });
            sender
                .send(req)
                .await
                .map_err(|_| EngineError::NotLoaded(name))?;
            match rx.recv().await {
                Some(Ok(toks)) => Ok(toks.len()),
                Some(Err(e)) => Err(EngineError::Validation(format!(
                    "the prompt cannot be tokenized: {e:#}"
                ))),
                None => Err(EngineError::Internal("tokenizer did not answer".into())),
            }
        });
        task.await
            .map_err(|e| EngineError::Internal(format!("tokenize task: {e}")))?
    }

    fn sender(&self, model: &LoadedModel) -> Result<mpsc::Sender<Request>, EngineError> {
        model
            .runner
            .get_sender(None)
            .map_err(|e| EngineError::Internal(format!("{e:?}")))
    }

    async fn send(&self, model: &LoadedModel, req: Request) -> Result<(), EngineError> {
        self.sender(model)?
            .send(req)
            .await
            .map_err(|_| EngineError::NotLoaded(model.card.name.clone()))
    }

    /// Starts a generation. Events arrive on the returned channel; dropping it cancels.
    pub async fn generate(
        &self,
        model: &LoadedModel,
        prompt: Prompt,
        sampling: Sampling,
    ) -> Result<mpsc::Receiver<Result<Event, EngineError>>, EngineError> {
        let (engine_tx, mut engine_rx) = mpsc::channel::<Response>(64);
        let (messages, tools, tool_choice) = match prompt {
            Prompt::Chat {
                messages,
                tools,
                tool_choice,
            } => (
                RequestMessage::Chat {
                    messages: chat_messages(&messages),
                    enable_thinking: None,
                    reasoning_effort: None,
                },
                convert_tools(&tools)?,
                convert_tool_choice(&tool_choice)?,
            ),
            Prompt::Text(text) => (
                RequestMessage::Completion {
                    text,
                    echo_prompt: false,
                    best_of: None,
                },
                None,
                None,
            ),
        };
        let constraint = match &sampling.format {
            OutputFormat::Text => Constraint::None,
            OutputFormat::JsonObject => {
                Constraint::JsonSchema(serde_json::json!({"type": "object"}))
            }
            OutputFormat::JsonSchema(s) => Constraint::JsonSchema(s.clone()),
        };
        let params = SamplingParams {
            temperature: sampling.temperature,
            top_k: sampling.top_k,
            top_p: sampling.top_p,
            min_p: sampling.min_p,
            top_n_logprobs: 0,
            frequency_penalty: sampling.frequency_penalty,
            presence_penalty: sampling.presence_penalty,
            repetition_penalty: sampling.repeat_penalty,
            stop_toks: if sampling.stop.is_empty() {
                None
            } else {
                Some(StopTokens::Seqs(sampling.stop.clone()))
            },
            max_len: sampling.max_tokens,
            logits_bias: None,
            n_choices: 1,
            dry_params: None,
        };
        let id = model.runner.next_request_id();
        let req = Request::Normal(Box::new(NormalRequest {
            messages,
            sampling_params: params,
            response: engine_tx,
            return_logprobs: false,
            is_streaming: true,
            id,
            constraint,
            suffix: None,
            tools,
            tool_choice,
            logits_processors: None,
            return_raw_logits: false,
            web_search_options: None,
            model_id: None,
            truncate_sequence: false,
        }));
        self.send(model, req).await?;
        let (tx, rx) = mpsc::channel(64);
        let stops = sampling.stop.clone();
        tokio::spawn(async move {
            let mut completion_tokens = 0usize;
            let mut holdback = StopHoldback::new(stops);
            loop {
                let resp = tokio::select! {
                    r = engine_rx.recv() => r,
                    // The client went away: dropping `engine_rx` makes the engine stop the sequence.
                    () = tx.closed() => return,
                };
                let Some(resp) = resp else {
                    let _ = tx
                        .send(Err(EngineError::Internal(
                            "the engine dropped the request".into(),
                        )))
                        .await;
                    return;
                };
                let (events, done) = convert(resp, &mut completion_tokens);
                for ev in holdback.apply(events) {
                    let last = matches!(ev, Ok(Event::Finished { .. }) | Err(_));
                    if tx.send(ev).await.is_err() || last {
                        return;
                    }
                }
                if done {
                    return;
                }
            }
        });
        Ok(rx)
    }
}

fn finish_reason(s: &str) -> FinishReason {
    match s {
        "length" => FinishReason::Length,
        "tool_calls" => FinishReason::ToolCalls,
        "stop" | "eos" => FinishReason::Stop,
        _ => FinishReason::Stop,
    }
}

fn tool_calls(calls: Option<&Vec<mistralrs_core::ToolCallResponse>>) -> Vec<ToolCall> {
    calls
        .into_iter()
        .flatten()
        .map(|c| ToolCall {
            id: c.id.clone(),
            name: c.function.name.clone(),
            arguments: c.function.arguments.clone(),
        })
        .collect()
}

/// Converts one engine response into our events; returns whether it was the last.
fn convert(
    resp: Response,
    completion_tokens: &mut usize,
) -> (Vec<Result<Event, EngineError>>, bool) {
    match resp {
        Response::Chunk(chunk) => {
            let mut out = Vec::new();
            let mut done = false;
            for choice in chunk.choices {
                let text = choice.delta.content.clone().unwrap_or_default();
                let calls = tool_calls(choice.delta.tool_calls.as_ref());
                if !text.is_empty() || !calls.is_empty() {
                    *completion_tokens += 1;
                    out.push(Ok(Event::Delta {
                        text,
                        tool_calls: calls,
                    }));
                }
                if let Some(reason) = &choice.finish_reason {
                    let usage = chunk
                        .usage
                        .as_ref()
                        .map(|u| Usage {
                            prompt_tokens: u.prompt_tokens,
                            completion_tokens: u.completion_tokens,
                        })
                        .unwrap_or(Usage {
                            prompt_tokens: 0,
                            completion_tokens: *completion_tokens,
                        });
                    out.push(Ok(Event::Finished {
                        reason: finish_reason(reason),
                        usage,
                    }));
                    done = true;
                }
            }
            (out, done)
        }
        Response::CompletionChunk(chunk) => {
            let mut out = Vec::new();
            let mut done = false;
            for choice in chunk.choices {
                if !choice.text.is_empty() {
                    *completion_tokens += 1;
                    out.push(Ok(Event::Delta {
                        text: choice.text.clone(),
                        tool_calls: Vec::new(),
                    }));
                }
                if let Some(reason) = &choice.finish_reason {
                    out.push(Ok(Event::Finished {
                        reason: finish_reason(reason),
                        usage: Usage {
                            prompt_tokens: 0,
                            completion_tokens: *completion_tokens,
                        },
                    }));
                    done = true;
                }
            }
            (out, done)
        }
        Response::Done(full) => {
            let mut out = Vec::new();
            for choice in full.choices {
                let text = choice.message.content.clone().unwrap_or_default();
                let calls = tool_calls(choice.message.tool_calls.as_ref());
                if !text.is_empty() || !calls.is_empty() {
                    out.push(Ok(Event::Delta {
                        text,
                        tool_calls: calls,
                    }));
                }
                out.push(Ok(Event::Finished {
                    reason: finish_reason(&choice.finish_reason),
                    usage: Usage {
                        prompt_tokens: full.usage.prompt_tokens,
                        completion_tokens: full.usage.completion_tokens,
                    },
                }));
            }
            (out, true)
        }
        Response::CompletionDone(full) => {
            let mut out = Vec::new();
            for choice in full.choices {
                if !choice.text.is_empty() {
                    out.push(Ok(Event::Delta {
                        text: choice.text.clone(),
                        tool_calls: Vec::new(),
                    }));
                }
                out.push(Ok(Event::Finished {
                    reason: finish_reason(&choice.finish_reason),
                    usage: Usage {
                        prompt_tokens: full.usage.prompt_tokens,
                        completion_tokens: full.usage.completion_tokens,
                    },
                }));
            }
            (out, true)
        }
        Response::ValidationError(e) => (vec![Err(EngineError::Validation(e.to_string()))], true),
        Response::InternalError(e) => (vec![Err(EngineError::Internal(e.to_string()))], true),
        Response::ModelError(m, _) | Response::CompletionModelError(m, _) => {
            (vec![Err(EngineError::Internal(m))], true)
        }
        _ => (
            vec![Err(EngineError::Internal(
                "unexpected engine response".into(),
            ))],
            true,
        ),
    }
}

/// Holds back streamed text that may be the start of a stop string, and cuts the text at a
/// stop string, so that clients never see the stop string (the engine streams it through).
struct StopHoldback {
    stops: Vec<String>,
    pending: String,
    stopped: bool,
}

impl StopHoldback {
    fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            pending: String::new(),
            stopped: false,
        }
    }

    /// Longest suffix of `pending` that is a proper prefix of some stop string.
    fn risky_suffix(&self) -> usize {
        let mut keep = 0;
        for stop in &self.stops {
            for (i, _) in stop.char_indices().skip(1) {
                if self.pending.ends_with(&stop[..i]) {
                    keep = keep.max(i);
                }
            }
        }
        keep
    }

    fn apply(
        &mut self,
        events: Vec<Result<Event, EngineError>>,
    ) -> Vec<Result<Event, EngineError>> {
        if self.stops.is_empty() {
            return events;
        }
        let mut out = Vec::new();
        for ev in events {
            match ev {
                Ok(Event::Delta { text, tool_calls }) => {
                    if self.stopped {
                        continue;
                    }
                    self.pending.push_str(&text);
                    let hit = self
                        .stops
                        .iter()
                        .filter_map(|s| self.pending.find(s.as_str()))
                        .min();
                    let emit = if let Some(i) = hit {
                        self.stopped = true;
                        let e = self.pending[..i].to_string();
                        self.pending.clear();
                        e
                    } else {
                        let keep = self.risky_suffix();
                        let cut = self.pending.len() - keep;
                        let e = self.pending[..cut].to_string();
                        self.pending.drain(..cut);
                        e
                    };
                    if !emit.is_empty() || !tool_calls.is_empty() {
                        out.push(Ok(Event::Delta {
                            text: emit,
                            tool_calls,
                        }));
                    }
                }
                Ok(Event::Finished { reason, usage }) => {
                    if !self.pending.is_empty() {
                        out.push(Ok(Event::Delta {
                            text: std::mem::take(&mut self.pending),
                            tool_calls: Vec::new(),
                        }));
                    }
                    let reason = if self.stopped {
                        FinishReason::Stop
                    } else {
                        reason
                    };
                    out.push(Ok(Event::Finished { reason, usage }));
                }
                Err(e) => out.push(Err(e)),
            }
        }
        out
    }
}

/// Chat turns in the engine's message shape.
fn chat_messages(turns: &[ChatTurn]) -> Vec<IndexMap<String, mistralrs_core::MessageContent>> {
    turns
        .iter()
        .map(|t| {
            let mut m = IndexMap::new();
            m.insert("role".to_string(), Either::Left(t.role.clone()));
            m.insert("content".to_string(), Either::Left(t.content.clone()));
            if let Some(id) = &t.tool_call_id {
                m.insert("tool_call_id".to_string(), Either::Left(id.clone()));
            }
            if let Some(name) = &t.name {
                m.insert("name".to_string(), Either::Left(name.clone()));
            }
            if let Some(serde_json::Value::Array(calls)) = &t.tool_calls {
                let parts = calls
                    .iter()
                    .filter_map(|c| c.as_object())
                    .map(|o| o.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                    .collect();
                m.insert("tool_calls".to_string(), Either::Right(parts));
            }
            m
        })
        .collect()
}

fn convert_tools(tools: &Option<Vec<serde_json::Value>>) -> Result<Option<Vec<Tool>>, EngineError> {
    let Some(tools) = tools else {
        return Ok(None);
    };
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::from_value::<Tool>(t.clone())
                .map_err(|e| EngineError::Validation(format!("tools[{i}]: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn convert_tool_choice(c: &Option<serde_json::Value>) -> Result<Option<ToolChoice>, EngineError> {
    match c {
        None => Ok(None),
        Some(serde_json::Value::String(s)) if s == "required" => Ok(Some(ToolChoice::Auto)),
        Some(v) => serde_json::from_value::<ToolChoice>(v.clone())
            .map(Some)
            .map_err(|e| EngineError::Validation(format!("tool_choice: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(t: &str) -> Result<Event, EngineError> {
        Ok(Event::Delta {
            text: t.to_string(),
            tool_calls: Vec::new(),
        })
    }

    fn texts(evs: &[Result<Event, EngineError>]) -> String {
        evs.iter()
            .filter_map(|e| match e {
                Ok(Event::Delta { text, .. }) => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn stop_strings_never_reach_the_client() {
        let mut h = StopHoldback::new(vec!["END".into()]);
        let mut seen = String::new();
        for t in ["Hello E", "N", "D and more"] {
            seen += &texts(&h.apply(vec![delta(t)]));
        }
        let fin = h.apply(vec![Ok(Event::Finished {
            reason: FinishReason::Length,
            usage: Usage::default(),
        })]);
        assert_eq!(seen, "Hello ");
        assert!(matches!(
            fin.last(),
            Some(Ok(Event::Finished {
                reason: FinishReason::Stop,
                ..
            }))
        ));
    }

    #[test]
    fn held_back_text_is_released_when_it_is_not_a_stop() {
        let mut h = StopHoldback::new(vec!["END".into()]);
        let a = texts(&h.apply(vec![delta("an E")]));
        assert_eq!(a, "an ");
        let b = texts(&h.apply(vec![delta("lephant")]));
        assert_eq!(b, "Elephant");
        let fin = h.apply(vec![
            delta("E"),
            Ok(Event::Finished {
                reason: FinishReason::Length,
                usage: Usage::default(),
            }),
        ]);
        assert_eq!(texts(&fin), "E");
    }
}
