//! `examples/custom_vae.rs` (a convolutional VAE made of candle modules, trained and evaluated
//! by elbo's `train::latent` through `LatentVariableModel`) runs, and learns: 150 steps of
//! IWAE_5 take the test NLL of 200 digits from about 543 nats (784 ln 2, the untrained model)
//! to below 200, the estimate sits below the -ELBO, and the latent is in use.

#[path = "../examples/custom_vae.rs"]
mod custom_vae;

#[test]
fn the_custom_vae_example_trains_and_evaluates() {
    let e = custom_vae::run(150).unwrap();
    assert!(e.nll < 200.0, "NLL {} after 150 steps", e.nll);
    assert!(
        e.nll <= e.neg_elbo,
        "NLL {} above -ELBO {}",
        e.nll,
        e.neg_elbo
    );
    assert_eq!(e.n, 200);
    assert!(e.active_units[0] > 0, "no active unit");
}
