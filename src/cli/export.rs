//! `elbo export diffusers RUN_OR_CHECKPOINT OUT_DIR`: a diffusion model as a diffusers pipeline
//! folder (`elbo::interop::diffusers::export`).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use candle_core::Device;
use clap::Args;

#[derive(Args)]
pub struct ExportDiffusersArgs {
    /// A diffusion run folder (train diffusion --out; its EMA model.safetensors), a checkpoint
    /// file, or a diffusers folder.
    #[arg(value_name = "RUN_OR_CHECKPOINT")]
    pub input: PathBuf,
    /// The pipeline folder to write (must not exist).
    #[arg(value_name = "OUT_DIR")]
    pub out: PathBuf,
}

pub fn export_diffusers(a: ExportDiffusersArgs) -> Result<()> {
    use elbo::interop::diffusers;
    let device = Device::Cpu;
    let hub = a
        .input
        .to_str()
        .filter(|t| elbo::interop::hub::looks_like_id(t))
        .map(|t| elbo::interop::hub::resolve(t, elbo::data::datasets::offline()))
        .transpose()?;
    let (config, tensors) = if let Some(folder) = hub {
        let (config, tensors, _, _) = diffusers::load_parts(&folder, &device)?;
        (config, tensors)
    } else if diffusers::is_diffusers_folder(&a.input) {
        let (config, tensors, _, _) = diffusers::load_parts(&a.input, &device)?;
        (config, tensors)
    } else {
        let file = checkpoint_file(&a.input)?;
        let loaded = elbo::checkpoint::load(&file, &device)?;
        let config = elbo::diffusion::config::model_config(&loaded, &file)?;
        // The network must build from the tensors, or the folder would not load.
        let vb = candle_nn::VarBuilder::from_tensors(
            loaded.tensors.clone(),
            candle_core::DType::F32,
            &device,
        );
        elbo::diffusion::nets::Net::build(&config.net, vb).map_err(|e| {
            anyhow::anyhow!(
                "{}: tensors do not fit the model: {}",
                file.display(),
                e.to_string().lines().next().unwrap_or("")
            )
        })?;
        (config, loaded.tensors)
    };
    diffusers::export(&config, &tensors, &a.out)?;
    eprintln!(
        "wrote {} (DDPMPipeline: model_index.json, unet/, scheduler/)",
        a.out.display()
    );
    Ok(())
}

/// A run folder's `model.safetensors`, or the file itself.
fn checkpoint_file(input: &Path) -> Result<PathBuf> {
    if input.is_dir() {
        let model = input.join(elbo::run_dir::MODEL);
        if !model.is_file() {
            bail!(
                "{}: neither a run folder (no {}) nor a diffusers folder (no model_index.json or config.json)",
                input.display(),
                elbo::run_dir::MODEL
            );
        }
        return Ok(model);
    }
    Ok(input.to_path_buf())
}
