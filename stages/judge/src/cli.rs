//! Command-line arguments: the judge stage (`halo-judge --candidate ... --summary ...`, what the
//! runner calls) and the `halo-judge compare` subcommand.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use haloflow_openai::client::ClientArgs;

/// The command-line name of a value of a [`ValueEnum`] (e.g. `openai`, `both`).
pub fn value_name(value: &impl ValueEnum) -> String {
    value.to_possible_value().map_or_else(String::new, |v| v.get_name().to_string())
}

const EXAMPLE: &str = r#"Example (GPT-4 as a judge, both orders, the HALOs template):
  export OPENAI_API_KEY=...
  halo-judge --candidate kto.arrow --baseline sft.arrow --prompts prompts.arrow \
      --judgments judgments.arrow --summary summary.json --report report \
      --backend openai --model gpt-4-0613 --template halos --concurrency 8

Example (a local OpenAI-compatible server, e.g. vLLM or llama.cpp's llama-server):
  halo-judge ... --base-url http://127.0.0.1:8000/v1 --model Qwen2.5-7B-Instruct --template mt-bench

Example (checkable answers, no model):
  halo-judge ... --backend rule --rule regex --answer-regex '(-?\d+(?:\.\d+)?)\s*$'

Several candidates against the same baseline, side by side:
  halo-judge compare --summary kto/summary.json --summary dpo/summary.json \
      --name KTO --name DPO --out compare/

alpaca_eval's model_outputs.json from samples, and back:
  halo-judge alpaca-eval export --samples kto.arrow --out model_outputs.json
  halo-judge alpaca-eval import --model-outputs model_outputs.json --out kto.arrow

Every pair (a candidate sample and the baseline's reply to the same prompt) is judged in both
orders by default; orders that disagree count as a tie, an invalid order makes the pair invalid.
Answers are cached in --cache-dir (one JSON line per answer, appended as it arrives): a rerun, or
a run resumed after being killed, asks the judge only what it has not answered yet. Requests that
still fail after the retries are recorded as invalid with the reason, are not cached, and fail
the stage when more than --max-failed-fraction of the requests failed. The API key is read from
the environment variable named by --api-key-env and never written anywhere.

The summary holds wins, losses, ties and invalid pairs, the win rate (ties as half) over valid
pairs with its 95% Wilson interval, the exact sign test of wins against losses, the weighted win
rate (from label probabilities: the local judge, or the openai judge's top_logprobs), mean
lengths, and a length-controlled win rate (see the crate's README). The report directory also
gets alpaca_eval's annotations.json."#;

/// Which judge answers the requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// Any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp, ...).
    Openai,
    /// A verifier of checkable answers against the prompts' `reference` (no model).
    Rule,
    /// An LLM judge run in-process (haloflow's model core on `--judge-model`): the verdict is
    /// the most probable label, from the log-probs of the template's labels.
    Local,
}

/// How the outputs of a pair are ordered for the judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Order {
    /// Judge each pair twice, candidate first and baseline first.
    Both,
    /// Judge each pair once, in an order drawn from --seed and the pair.
    Random,
}

/// How the `rule` backend decides whether an output is correct.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RuleMode {
    /// The whole output equals the reference (whitespace collapsed, case folded).
    Exact,
    /// The last match of --answer-regex in the output equals the reference's (normalized).
    Regex,
}

/// Judge a candidate's samples against a baseline, pairwise, and report win rates.
#[derive(Parser, Debug, Clone)]
#[command(name = "halo-judge", version, after_help = EXAMPLE)]
pub struct JudgeArgs {
    /// Input `samples` of the model under evaluation (Arrow IPC or Parquet).
    #[arg(long)]
    pub candidate: PathBuf,
    /// Input baseline: another model's `samples`, or a `paired` table whose `chosen` replies are
    /// the baseline.
    #[arg(long)]
    pub baseline: PathBuf,
    /// Optional input `prompts`: adds each prompt's `reference` and `category`.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Optional input: a template file of your own (TOML; see the crate's README), instead of
    /// --template.
    #[arg(long)]
    pub template_file: Option<PathBuf>,
    /// Output `judgments` table (Arrow IPC): one row per judge request.
    #[arg(long)]
    pub judgments: PathBuf,
    /// Output summary (JSON).
    #[arg(long)]
    pub summary: PathBuf,
    /// Output report directory: report.md and win_rate.svg.
    #[arg(long)]
    pub report: PathBuf,
    /// Judge backend.
    #[arg(long, value_enum, default_value_t = BackendKind::Openai)]
    pub backend: BackendKind,
    /// Built-in template: halos, mt-bench or alpaca-eval.
    #[arg(long, default_value = "halos")]
    pub template: String,
    /// Order of the outputs shown to the judge.
    #[arg(long, value_enum, default_value_t = Order::Both)]
    pub order: Order,
    /// Seed of the random order and of the judge's sampling (sent as `seed`).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The OpenAI-compatible API (openai backend; requests go to BASE_URL/chat/completions).
    #[command(flatten)]
    pub client: ClientArgs,
    /// Judge model name (required with --backend openai).
    #[arg(long)]
    pub model: Option<String>,
    /// Judge sampling temperature.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Most tokens of a judge answer (default: the template's, else 1024).
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Fail the stage (after writing its outputs) when more than this fraction of the requests
    /// failed.
    #[arg(long, default_value_t = 0.1)]
    pub max_failed_fraction: f64,
    /// Rule backend: how an output is checked against the reference.
    #[arg(long, value_enum, default_value_t = RuleMode::Exact)]
    pub rule: RuleMode,
    /// Rule backend with --rule regex: the answer is this regex's last match in an output
    /// (its first capture group, if it has one).
    #[arg(long)]
    pub answer_regex: Option<String>,
    /// Local backend: the judge model (a Hugging Face directory haloflow can load).
    #[arg(long)]
    pub judge_model: Option<PathBuf>,
    /// Local backend: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Local backend: auto (bf16 on CUDA, f32 on CPU), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Local backend: CPU threads for libtorch (default: libtorch's choice).
    #[arg(long)]
    pub threads: Option<i32>,
    /// Openai backend: ask for the first answer token's `top_logprobs` (this many, at most 20;
    /// 0: do not ask) and report the weighted win rate from the verdict labels' probabilities.
    /// A server that refuses the parameter (HTTP 400) is asked again without it.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=20))]
    pub top_logprobs: u32,
    /// Directory of the response cache (created if missing). Default: $HALO_STAGE_CACHE_DIR/judge
    /// when the runner sets HALO_STAGE_CACHE_DIR (inside its work dir), else .halo/judge-cache
    /// in the working directory.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Name of the candidate in the report and summary (default: its samples' `model`).
    #[arg(long)]
    pub candidate_name: Option<String>,
    /// Name of the baseline in the report and summary (default: its samples' `model`, or
    /// `chosen` for a paired baseline).
    #[arg(long)]
    pub baseline_name: Option<String>,
}

/// `halo-judge compare`: several candidates' summaries side by side.
#[derive(Parser, Debug, Clone)]
#[command(name = "halo-judge compare", bin_name = "halo-judge compare", version)]
pub struct CompareArgs {
    /// A summary.json written by halo-judge; repeat for each candidate, in display order.
    #[arg(long, required = true)]
    pub summary: Vec<PathBuf>,
    /// Display name of each summary, in the same order (default: its candidate's model name).
    #[arg(long)]
    pub name: Vec<String>,
    /// Output directory: compare.md and win_rates.svg.
    #[arg(long)]
    pub out: PathBuf,
}

/// `halo-judge alpaca-eval`: converts between haloflow's `samples` and alpaca_eval's
/// `model_outputs.json`.
#[derive(Parser, Debug, Clone)]
#[command(name = "halo-judge alpaca-eval", bin_name = "halo-judge alpaca-eval", version)]
pub struct AlpacaEvalArgs {
    /// What to convert.
    #[command(subcommand)]
    pub command: AlpacaEvalCommand,
}

/// The conversions.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum AlpacaEvalCommand {
    /// A `samples` table to alpaca_eval's model_outputs.json (a JSON list of objects with
    /// instruction, output, generator; haloflow's own columns ride along as extra keys).
    Export {
        /// Input `samples` table (Arrow IPC or Parquet).
        #[arg(long)]
        samples: PathBuf,
        /// Output model_outputs.json.
        #[arg(long)]
        out: PathBuf,
        /// Value of every object's `dataset` key (alpaca_eval's subset name); none by default.
        #[arg(long)]
        dataset: Option<String>,
    },
    /// alpaca_eval's model_outputs.json (ours or alpaca_eval's) to a `samples` table.
    Import {
        /// Input model_outputs.json.
        #[arg(long)]
        model_outputs: PathBuf,
        /// Output `samples` table (Arrow IPC).
        #[arg(long)]
        out: PathBuf,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_option_says_what_it_is() {
        for command in [JudgeArgs::command(), CompareArgs::command(), AlpacaEvalArgs::command()] {
            let mut commands = vec![command];
            while let Some(command) = commands.pop() {
                for arg in command.get_arguments() {
                    let name = arg.get_long().unwrap_or(arg.get_id().as_str());
                    assert!(arg.get_help().is_some(), "`{} --{name}` has no help", command.get_name());
                }
                commands.extend(command.get_subcommands().cloned());
            }
        }
        let judge = JudgeArgs::command();
        let help = |id: &str| judge.get_arguments().find(|a| a.get_id() == id).unwrap().get_help().unwrap().to_string();
        assert!(help("judge_model").starts_with("Local backend: the judge model"), "{}", help("judge_model"));
        assert!(help("cache_dir").starts_with("Directory of the response cache"), "{}", help("cache_dir"));
    }
}
