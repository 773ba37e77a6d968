//! `elbo schedule`: the noise schedule's arrays, as a table or JSON.

use super::*;

#[derive(Args)]
pub struct ScheduleArgs {
    #[arg(long, value_enum, default_value = "linear")]
    pub beta_schedule: BetaSchedule,
    /// The number of diffusion steps T (diffusers' `num_train_timesteps`).
    #[arg(
        long = "num-train-timesteps",
        visible_alias = "timesteps",
        allow_negative_numbers = true,
        default_value_t = 1000
    )]
    pub num_train_timesteps: usize,
    /// One JSON object with every array (index t = 0..T-1).
    #[arg(long)]
    pub json: bool,
}

pub fn schedule_command(a: ScheduleArgs) -> Result<()> {
    let s = Schedule::new(a.beta_schedule, a.num_train_timesteps)?;
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        println!(
            "{:>5} {:>12} {:>12} {:>14} {:>14} {:>14} {:>12}",
            "t", "beta", "alpha", "alphas_cumprod", "sqrt(1-abar)", "post_variance", "snr"
        );
        for t in 0..s.len() {
            println!(
                "{t:>5} {:>12.6e} {:>12.8} {:>14.8e} {:>14.8} {:>14.6e} {:>12.4e}",
                s.betas[t],
                s.alphas[t],
                s.alphas_cumprod[t],
                s.sqrt_one_minus_alphas_cumprod[t],
                s.posterior_variance[t],
                s.snr[t]
            );
        }
    }
    Ok(())
}
