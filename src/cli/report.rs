//! `elbo report RUN_DIR`: the run's HTML page.

use super::*;

#[derive(Args)]
pub struct ReportArgs {
    /// The run folder (`train --out`).
    pub run_dir: PathBuf,
    /// Where to write the page [default: RUN_DIR/report.html].
    #[arg(long, value_name = "FILE.html")]
    pub out: Option<PathBuf>,
}

pub fn report_command(a: ReportArgs) -> Result<()> {
    let out = a.out.unwrap_or_else(|| a.run_dir.join("report.html"));
    elbo::report::write_report(&a.run_dir, &out)?;
    eprintln!("report: {}", out.display());
    Ok(())
}
