//! The binary's commands end to end on the CPU: parsing, outputs, resume, compare, info, demo.

use std::path::Path;

use clap::{Parser, ValueEnum};
use hylo_train::app::{info, run_training, Cli, Command, InfoArgs, TrainCommand};
use hylo_train::demo::{run as run_demo, table, DemoArgs};
use hylo_train::output::read_metrics;
use hylo_train::trainer::Stop;

fn parse(line: &str) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(line.split_whitespace())
}

fn train_command(line: &str) -> TrainCommand {
    match parse(line).unwrap().command {
        Some(Command::Classify(c)) | Some(Command::Segment(c)) => c,
        other => panic!("not a training command: {other:?}"),
    }
}

fn tiny(optim: &str, out: &Path, extra: &str) -> TrainCommand {
    let epochs = if extra.contains("--epochs") {
        ""
    } else {
        "--epochs 2"
    };
    train_command(&format!(
        "hylo-train classify --optim {optim} {epochs} --train-samples 256 --val-samples 64 \
         --batch-size 32 --freq 3 --out {} {extra}",
        out.display()
    ))
}

/// Each `(flags, needle)`: `classify` with the flags parses, and validation fails with a message
/// containing the needle (the flag's name).
fn assert_rejected(cases: &[(&str, &str)]) {
    for (bad, needle) in cases {
        let err = train_command(&format!("hylo-train classify {bad}"))
            .args
            .validate()
            .unwrap_err();
        assert!(err.contains(needle), "{bad}: {err}");
    }
}

#[test]
fn the_issue_command_lines_parse_and_bad_ones_are_rejected() {
    let c = train_command(
        "hylo-train classify --model resnet32 --dataset cifar10 --data-dir /data --optim hylo \
         --epochs 100 --batch-size 128 --lr 1.8 --momentum 0.9 --weight-decay 4.5e-4 \
         --warmup-epochs 5 --milestones 35,75,90 --lr-decay 0.3 --damping 1.5 \
         --target-damping 0.1 --damping-decay 90 --freq 13 --rho 0.1 --switch epochs:10,35,40 \
         --device cpu --seed 0 --out runs/r32-hylo",
    );
    assert_eq!(c.args.milestones, vec![35, 75, 90]);
    c.args.validate().unwrap();
    assert!(matches!(
        c.args.switch_policy(390).unwrap(),
        hylo_optim::SwitchPolicy::Epochs {
            a: 10,
            b: 35,
            c: 40,
            steps_per_epoch: 390
        }
    ));
    let seg =
        train_command("hylo-train segment --model unet --dataset lgg --data-dir /d --optim hylo");
    seg.args.validate().unwrap();
    assert!(parse("hylo-train info --model resnet50").is_ok());
    assert!(parse("hylo-train compare runs/a runs/b --out cmp.png").is_ok());

    for bad in [
        "--epochs 0",
        "--optim lbfgs",
        "--dataset imagenet21k",
        "--batch-size 0",
    ] {
        assert!(
            parse(&format!("hylo-train classify {bad}")).is_err(),
            "{bad}"
        );
    }
    assert_rejected(&[
        ("--switch epochs:1,2", "--switch"),
        ("--switch epochs:5,2,9", "A <= B <= C"),
        ("--model resnet33", "resnet33"),
        ("--dataset cifar10", "--data-dir"),
        ("--freq 2 --inverse-every 3", "--inverse-every"),
        ("--model unet", "does not fit"),
        ("--device tpu", "tpu"),
        ("--rho 1.5", "--rho"),
        ("--lr=-1", "--lr"),
        ("--milestones 5,3", "--milestones"),
        ("--conv-mode fancy", "--conv-mode"),
        ("--graft adam", "--graft"),
        ("--damping 1 --target-damping 0.1", "--damping-decay"),
    ]);
}

#[test]
fn a_short_run_writes_every_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let outcome = run_training("classify", tiny("hylo", &out, "")).unwrap();
    assert_eq!(
        (outcome.stop, outcome.state.epoch, outcome.state.global_step),
        (Stop::Finished, 2, 16)
    );
    for file in [
        "config.json",
        "metrics.csv",
        "train.log",
        "curves.png",
        "checkpoint/model.bin",
        "checkpoint/optimizer.bin",
        "checkpoint/state.json",
    ] {
        assert!(out.join(file).is_file(), "missing {file}");
    }
    let header = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert!(header
        .starts_with("epoch,step,wall_s,train_loss,train_acc,val_loss,val_acc,lr,damping,mode"));
    let rows = read_metrics(&out.join("metrics.csv")).unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows
        .iter()
        .all(|r| r.train_loss.is_finite() && (r.mode == "kid" || r.mode == "kis")));
    assert!(std::fs::read_to_string(out.join("train.log"))
        .unwrap()
        .contains("epoch 2 step 16"));
    let png = std::fs::read(out.join("curves.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
}

#[test]
fn kfac_inverts_by_either_method() {
    let dir = tempfile::tempdir().unwrap();
    for method in ["eigen", "inverse"] {
        let out = dir.path().join(method);
        let command = tiny("kfac", &out, &format!("--kfac-method {method}"));
        assert_eq!(
            command
                .args
                .kfac_method
                .to_possible_value()
                .unwrap()
                .get_name(),
            method
        );
        let outcome = run_training("classify", command).unwrap();
        assert_eq!(outcome.stop, Stop::Finished);
        assert!(
            outcome.final_val.1 > 0.5,
            "{method}: {:?}",
            outcome.final_val
        );
        // The saved config resumes with the same method.
        let saved = std::fs::read_to_string(out.join("config.json")).unwrap();
        assert!(
            saved.contains(&format!("\"kfac_method\": \"{method}\"")),
            "{saved}"
        );
    }
    assert!(parse("hylo-train classify --kfac-method cholesky").is_err());
}

#[test]
fn resume_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let err = run_training(
        "classify",
        train_command(&format!(
            "hylo-train classify --resume {}",
            dir.path().display()
        )),
    )
    .unwrap_err();
    assert!(err.contains("config.json"), "{err}");
    let out = dir.path().join("r");
    run_training("classify", tiny("sgd", &out, "--epochs 1")).unwrap();
    let err = run_training(
        "segment",
        train_command(&format!("hylo-train segment --resume {}", out.display())),
    )
    .unwrap_err();
    assert!(err.contains("classify"), "{err}");
}

#[test]
fn a_folder_holding_a_run_is_not_overwritten_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r");
    run_training("classify", tiny("sgd", &out, "--epochs 1")).unwrap();
    let first = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    let err = run_training("classify", tiny("sgd", &out, "--epochs 1 --lr 0.05")).unwrap_err();
    assert!(
        err.contains("holds a run already")
            && err.contains("--resume")
            && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("metrics.csv")).unwrap(),
        first
    );
    run_training(
        "classify",
        tiny("sgd", &out, "--epochs 1 --lr 0.05 --overwrite"),
    )
    .unwrap();
    assert_ne!(
        std::fs::read_to_string(out.join("metrics.csv")).unwrap(),
        first
    );
    // Without --out: the first free runs/<command>-<model>-<optim>[-N].
    let root = dir.path().join("runs");
    assert_eq!(
        hylo_train::training::free_run_dir(&root, "classify-mlp-sgd"),
        root.join("classify-mlp-sgd")
    );
    std::fs::create_dir_all(root.join("classify-mlp-sgd")).unwrap();
    std::fs::write(root.join("classify-mlp-sgd/config.json"), "{}").unwrap();
    assert_eq!(
        hylo_train::training::free_run_dir(&root, "classify-mlp-sgd"),
        root.join("classify-mlp-sgd-2")
    );
}

#[test]
fn segmentation_runs_with_dice_and_compare_draws_runs() {
    let dir = tempfile::tempdir().unwrap();
    let seg = dir.path().join("seg");
    let c = train_command(&format!(
        "hylo-train segment --model unet --dataset shapes --init-features 4 --train-samples 32 \
         --val-samples 8 --batch-size 8 --epochs 1 --image-size 32 --optim sngd --freq 2 --out {}",
        seg.display()
    ));
    run_training("segment", c).unwrap();
    let text = std::fs::read_to_string(seg.join("metrics.csv")).unwrap();
    assert!(text.contains("train_dice") && text.contains("val_dice"));
    let rows = read_metrics(&seg.join("metrics.csv")).unwrap();
    assert!((0.0..=1.0).contains(&rows[0].val_score));

    let cls = dir.path().join("cls");
    run_training("classify", tiny("adam", &cls, "--lr 0.01 --epochs 1")).unwrap();
    let png = dir.path().join("cmp.png");
    hylo_train::plot::compare(&[seg, cls], &png).unwrap();
    assert_eq!(&std::fs::read(&png).unwrap()[..4], b"\x89PNG");
    let err = hylo_train::plot::compare(&[dir.path().join("missing")], &png).unwrap_err();
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn data_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("train.bin"), [1u8; 100]).unwrap();
    let c = train_command(&format!(
        "hylo-train classify --model resnet20 --dataset cifar100 --data-dir {} --out {}",
        dir.path().display(),
        dir.path().join("out").display()
    ));
    let err = run_training("classify", c).unwrap_err();
    assert!(
        err.contains("train.bin") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn info_lists_parameters_and_layers() {
    let defaults = |model: &str| InfoArgs {
        model: model.into(),
        classes: None,
        channels: None,
        image_size: None,
        conv_bias: false,
        init_features: 32,
    };
    let report = info(&defaults("resnet50")).unwrap();
    assert!(
        report.starts_with("resnet50: 25557032 parameters, 54 preconditioned layers"),
        "{report}"
    );
    assert_eq!(report.lines().count(), 55);
    assert!(report.contains("Linear") && report.contains("[64, 3, 7, 7]"));
    assert!(report.contains("input as in ImageNet: 3x224x224 inputs, 1000 classes"));
    let unet = info(&InfoArgs {
        image_size: Some(64),
        ..defaults("unet")
    })
    .unwrap();
    assert!(
        unet.starts_with("unet: 7763041 parameters, 19 preconditioned layers"),
        "{unet}"
    );
    assert!(unet.contains("input as given: 3x64x64"), "{unet}");
    // Each model defaults to the data it was made for.
    let r32 = info(&defaults("resnet32")).unwrap();
    assert!(
        r32.starts_with("resnet32: 464154 parameters")
            && r32.contains("input as in CIFAR-10: 3x32x32 inputs, 10 classes"),
        "{r32}"
    );
    let three = info(&defaults("3c1f")).unwrap();
    assert!(
        three.starts_with("3c1f: 5485958 parameters")
            && three.contains("input as in Fashion-MNIST: 1x28x28 inputs, 10 classes"),
        "{three}"
    );
    let custom = info(&InfoArgs {
        classes: Some(100),
        ..defaults("resnet32")
    })
    .unwrap();
    assert!(
        custom.starts_with("resnet32: 470004 parameters"),
        "{custom}"
    );
}

#[test]
fn the_demo_runs_every_optimizer_and_draws() {
    let dir = tempfile::tempdir().unwrap();
    let demo = DemoArgs {
        budget: 1.0,
        out: dir.path().to_path_buf(),
        ..DemoArgs::default()
    };
    let results = run_demo(&demo).unwrap();
    assert_eq!(results.len(), 3);
    assert!(results
        .iter()
        .all(|r| r.steps > 0 && r.final_accuracy.is_finite()));
    let t = table(&results, 0.9);
    assert!(
        t.contains("| sgd |") && t.contains("| kfac |") && t.contains("| hylo |"),
        "{t}"
    );
    assert!(dir.path().join("demo.png").is_file());
    // The real digits, from the binary: 4,000 training images, 62 steps an epoch at batch 64.
    assert!(dir.path().join("data/train-images-idx3-ubyte.gz").is_file());
    let log = std::fs::read_to_string(dir.path().join("sgd/config.json")).unwrap();
    assert!(log.contains("\"dataset\": \"mnist\""), "{log}");
}

#[test]
fn damping_and_kl_clip_flags_parse_with_their_defaults() {
    use hylo_train::cli::DampingArg;
    let args = train_command("hylo-train classify").args;
    assert_eq!(args.damping, DampingArg::Auto(DampingArg::AUTO_START));
    assert_eq!(args.kl_clip(), None, "no clip unless asked for");
    let args = train_command("hylo-train classify --damping 0.3").args;
    assert_eq!(
        (args.damping, args.kl_clip()),
        (DampingArg::Value(0.3), None),
        "the paper's fixed damping runs unclipped"
    );
    let args = train_command("hylo-train classify --damping auto:0.01 --kl-clip 0").args;
    assert_eq!(
        (args.damping, args.kl_clip()),
        (DampingArg::Auto(0.01), None)
    );
    let args = train_command("hylo-train classify --damping 0.3 --kl-clip 0.01").args;
    assert_eq!(args.kl_clip(), Some(0.01));
    // The config written for --resume keeps the choice.
    for damping in [
        DampingArg::Auto(1.0),
        DampingArg::Auto(0.01),
        DampingArg::Value(0.3),
    ] {
        let json = serde_json::to_string(&damping).unwrap();
        assert_eq!(serde_json::from_str::<DampingArg>(&json).unwrap(), damping);
    }
    assert!(parse("hylo-train classify --damping auto:x").is_err());
    assert!(parse("hylo-train classify --damping tiny").is_err());
    assert_rejected(&[
        ("--kl-clip=-1", "--kl-clip"),
        (
            "--damping auto --target-damping 0.1 --damping-decay 5",
            "--target-damping",
        ),
        ("--classes 17", "--classes"),
        ("--noise=-1", "--noise"),
    ]);
}

#[test]
fn the_synthetic_set_takes_its_classes_and_noise_from_the_flags() {
    let dir = tempfile::tempdir().unwrap();
    let c = tiny(
        "sgd",
        &dir.path().join("run"),
        "--classes 9 --noise 0.2 --image-size 12 --epochs 1",
    );
    let data = hylo_train::data::load(&c.args).unwrap();
    assert_eq!(data.classes(), 9);
    // The background noise has the amplitude asked for (uniform sums in [-noise, noise]).
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
    let sample = data.train.load(0, &mut rng).unwrap();
    let background = sample
        .pixels
        .iter()
        .filter(|p| **p < 0.0)
        .fold(0f32, |m, p| m.min(*p));
    assert!((-0.2..-0.1).contains(&background), "{background}");
    let outcome = run_training("classify", c).unwrap();
    assert_eq!(outcome.stop, Stop::Finished);
}

#[test]
fn the_race_plot_draws_odd_losses_and_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let header = "epoch,step,wall_s,train_loss,train_acc,val_loss,val_acc,lr,damping,mode\n";
    let runs = [
        (
            "a",
            "1,4,0.5,2.0,0.3,2.0,0.4,0.1,1.0,kid\n2,8,1.0,0.0,0.9,0.5,0.85,0.1,0.5,kid\n",
        ),
        (
            "b",
            "1,4,0.7,NaN,0.1,NaN,0.1,0.1,,sgd\n2,8,1.4,inf,0.1,NaN,0.1,0.1,,sgd\n",
        ),
    ];
    let mut labelled = Vec::new();
    for (name, rows) in runs {
        let run = dir.path().join(name);
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(run.join("metrics.csv"), format!("{header}{rows}")).unwrap();
        labelled.push((run, format!("{name}: 80% at 1.0 s")));
    }
    let png = dir.path().join("race.png");
    hylo_train::plot::race(&labelled, 0.8, &png).unwrap();
    assert_eq!(&std::fs::read(&png).unwrap()[..4], b"\x89PNG");
    let err =
        hylo_train::plot::race(&[(dir.path().join("missing"), "x".into())], 0.8, &png).unwrap_err();
    assert!(err.contains("missing"), "{err}");
}
