//! Sending images: one file (unary Infer when it fits in one message, else UploadImage in
//! chunks) and a study (many files on one StudyStream), with progress bars on a terminal.
//! Files are read as they are sent, never all at once.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use medai_proto::common::v1::ImageFormat;
use medai_proto::gateway::v1 as gw;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::exit::CliError;

/// Files up to this size go in one Infer message (gRPC's customary default message size);
/// larger ones are streamed through UploadImage.
pub const ONE_MESSAGE_BYTES: u64 = 4 * 1024 * 1024;
/// The size of each UploadImage chunk.
pub const CHUNK_BYTES: usize = 1024 * 1024;
/// Images read ahead of the gateway on a study stream (it slows the client down beyond its
/// own small in-flight bound anyway).
const STUDY_READ_AHEAD: usize = 4;

pub fn format_of(path: &Path) -> ImageFormat {
    let extension = path
        .extension()
        .and_then(|extension| extension.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    match extension.as_str() {
        "dcm" | "dicom" => ImageFormat::Dicom,
        "png" => ImageFormat::Png,
        "jpg" | "jpeg" => ImageFormat::Jpeg,
        _ => ImageFormat::Unspecified,
    }
}

/// A progress bar on stderr when it is a terminal; hidden otherwise (pipes, CI, tests).
pub fn progress_bar(length: u64, template: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(length);
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Times `medai infer` resumes an upload whose stream broke before it gives up.
pub const MAX_UPLOAD_RESUMES: u32 = 5;

/// A call that broke in transit (the connection or stream went away, or the gateway had not
/// yet noticed the last one had), as opposed to an answer about the request: worth resuming.
pub fn upload_stream_broke(status: &tonic::Status) -> bool {
    let reason = medai_runtime::errors::reason_of(status);
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
            reason.is_none()
        }
        tonic::Code::Aborted => reason.as_deref() == Some("UPLOAD_IN_USE"),
        _ => false,
    }
}

/// The messages of an upload: the header, then the file in chunks as it is read from the
/// header's offset (a resumed upload). A file that cannot be read (checked before) ends the
/// stream early; the gateway then refuses the upload as incomplete against its declared size.
pub fn upload_messages(
    file: &Path,
    header: gw::UploadHeader,
    progress: indicatif::ProgressBar,
) -> ReceiverStream<gw::UploadImageRequest> {
    let file = file.to_owned();
    let (sender, receiver) = mpsc::channel(2);
    let offset = header.offset;
    tokio::task::spawn_blocking(move || {
        let first = gw::UploadImageRequest {
            part: Some(gw::upload_image_request::Part::Header(header)),
        };
        if sender.blocking_send(first).is_err() {
            return;
        }
        let Ok(mut reader) = std::fs::File::open(&file) else {
            return;
        };
        if std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(offset)).is_err() {
            return;
        }
        let mut buffer = vec![0u8; CHUNK_BYTES];
        loop {
            let read = match reader.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            progress.inc(read as u64);
            let chunk = gw::UploadImageRequest {
                part: Some(gw::upload_image_request::Part::Chunk(
                    buffer[..read].to_vec(),
                )),
            };
            if sender.blocking_send(chunk).is_err() {
                break;
            }
        }
    });
    ReceiverStream::new(receiver)
}

/// Every file named, folders walked (sorted, hidden files and DICOMDIR skipped).
pub fn collect_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, CliError> {
    let mut files = Vec::new();
    for input in inputs {
        let metadata = std::fs::metadata(input).map_err(|error| {
            CliError::Usage(format!("cannot read {}: {error}", input.display()))
        })?;
        if metadata.is_dir() {
            walk(input, &mut files).with_context(|| format!("cannot list {}", input.display()))?;
        } else {
            files.push(input.clone());
        }
    }
    if files.is_empty() {
        return Err(CliError::Usage("no files to send".to_owned()));
    }
    Ok(files)
}

fn walk(folder: &Path, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(folder)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or_default();
        if name.starts_with('.') || name.eq_ignore_ascii_case("DICOMDIR") {
            continue;
        }
        if path.is_dir() {
            walk(&path, files)?;
        } else if path.is_file() {
            files.push(path);
        }
    }
    Ok(())
}

/// The SOP Instance UID of a DICOM file (read up to the pixel data only), if it has one.
pub fn sop_instance_uid(file: &Path) -> Option<String> {
    use dicom_dictionary_std::tags;
    let object = dicom_object::OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(file)
        .ok()?;
    let uid = object
        .element(tags::SOP_INSTANCE_UID)
        .ok()?
        .to_str()
        .ok()?
        .trim_end_matches(['\0', ' '])
        .to_owned();
    (!uid.is_empty()).then_some(uid)
}

/// The idempotency key of a study image: its SOP Instance UID with the model asked for, so the
/// same instance sent again (a retry, a resumed study) gets its stored result back.
pub fn idempotency_key(sop_instance_uid: &str, model_name: &str, model_version: &str) -> String {
    let model = if model_name.is_empty() {
        "default"
    } else {
        model_name
    };
    if model_version.is_empty() {
        format!("{sop_instance_uid}@{model}")
    } else {
        format!("{sop_instance_uid}@{model}:{model_version}")
    }
}

/// What happened to one file of a study.
#[derive(Clone, Debug)]
pub struct StudyOutcome {
    pub file: PathBuf,
    /// True when the key came from the file's SOP Instance UID.
    pub keyed: bool,
    pub result: Result<gw::InferResponse, ImageRefusal>,
}

#[derive(Clone, Debug)]
pub struct ImageRefusal {
    /// The gRPC code's name, or `LOCAL` for a file that could not be read here.
    pub code: String,
    pub reason: String,
    pub message: String,
}

/// What the study's stream reported at its end, besides the per-image outcomes.
pub struct StudyRun {
    pub outcomes: Vec<StudyOutcome>,
    pub stream_error: Option<tonic::Status>,
}

/// Sends `files` on one StudyStream and collects an outcome per file, in the files' order.
pub async fn send_study(
    client: &mut crate::client::GatewayClient,
    token: &str,
    files: Vec<PathBuf>,
    model_name: &str,
    model_version: &str,
) -> Result<StudyRun, CliError> {
    let progress = progress_bar(
        files.len() as u64,
        "{spinner} {pos}/{len} images [{bar:30}] {elapsed_precise} {msg}",
    );
    let mut outcomes: Vec<Option<StudyOutcome>> = vec![None; files.len()];
    let mut keyed = vec![false; files.len()];
    let (sender, receiver) = mpsc::channel::<gw::StudyStreamRequest>(STUDY_READ_AHEAD);
    let (local_failures_sender, mut local_failures) =
        mpsc::unbounded_channel::<(usize, bool, ImageRefusal)>();
    let (keyed_sender, mut keyed_receiver) = mpsc::unbounded_channel::<usize>();
    {
        let files = files.clone();
        let model_name = model_name.to_owned();
        let model_version = model_version.to_owned();
        tokio::task::spawn_blocking(move || {
            for (index, file) in files.iter().enumerate() {
                let image = match std::fs::read(file) {
                    Ok(image) => image,
                    Err(error) => {
                        let refusal = ImageRefusal {
                            code: "LOCAL".to_owned(),
                            reason: "FILE_UNREADABLE".to_owned(),
                            message: error.to_string(),
                        };
                        let _ = local_failures_sender.send((index, false, refusal));
                        continue;
                    }
                };
                let format = format_of(file);
                let key = if format == ImageFormat::Dicom || format == ImageFormat::Unspecified {
                    sop_instance_uid(file)
                        .map(|uid| idempotency_key(&uid, &model_name, &model_version))
                } else {
                    None
                };
                if key.is_some() {
                    let _ = keyed_sender.send(index);
                }
                let request = gw::StudyStreamRequest {
                    tag: index.to_string(),
                    image: image.into(),
                    format: format.into(),
                    model_name: model_name.clone(),
                    model_version: model_version.clone(),
                    idempotency_key: key.unwrap_or_default(),
                };
                if sender.blocking_send(request).is_err() {
                    break;
                }
            }
        });
    }
    let mut responses = client
        .study_stream(crate::client::authorised(
            ReceiverStream::new(receiver),
            token,
        ))
        .await
        .map_err(|status| CliError::refused("the study", &status))?
        .into_inner();
    let mut stream_error = None;
    loop {
        match responses.message().await {
            Ok(Some(answer)) => {
                let Ok(index) = answer.tag.parse::<usize>() else {
                    continue;
                };
                let Some(file) = files.get(index) else {
                    continue;
                };
                let result = match answer.outcome {
                    Some(gw::study_stream_response::Outcome::Result(result)) => Ok(result),
                    Some(gw::study_stream_response::Outcome::Error(error)) => Err(ImageRefusal {
                        code: format!("{:?}", tonic::Code::from(error.code)),
                        reason: error.reason,
                        message: error.message,
                    }),
                    None => Err(ImageRefusal {
                        code: "Unknown".to_owned(),
                        reason: String::new(),
                        message: "the gateway answered without an outcome".to_owned(),
                    }),
                };
                if let Some(slot) = outcomes.get_mut(index) {
                    *slot = Some(StudyOutcome {
                        file: file.clone(),
                        keyed: false,
                        result,
                    });
                }
                progress.inc(1);
            }
            Ok(None) => break,
            Err(status) => {
                stream_error = Some(status);
                break;
            }
        }
    }
    progress.finish_and_clear();
    while let Ok((index, keyed, refusal)) = local_failures.try_recv() {
        if let (Some(slot), Some(file)) = (outcomes.get_mut(index), files.get(index)) {
            *slot = Some(StudyOutcome {
                file: file.clone(),
                keyed,
                result: Err(refusal),
            });
        }
    }
    while let Ok(index) = keyed_receiver.try_recv() {
        if let Some(flag) = keyed.get_mut(index) {
            *flag = true;
        }
    }
    let unanswered = |file: &PathBuf| StudyOutcome {
        file: file.clone(),
        keyed: false,
        result: Err(ImageRefusal {
            code: "Unknown".to_owned(),
            reason: "NOT_ANSWERED".to_owned(),
            message: "the stream ended before this image was answered".to_owned(),
        }),
    };
    let outcomes = outcomes
        .into_iter()
        .zip(files.iter())
        .zip(keyed)
        .map(|((outcome, file), keyed)| {
            let mut outcome = outcome.unwrap_or_else(|| unanswered(file));
            outcome.keyed = keyed;
            outcome
        })
        .collect();
    Ok(StudyRun {
        outcomes,
        stream_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_broken_stream_is_resumed() {
        use medai_runtime::errors::{ErrorKind, status_with_reason};
        assert!(upload_stream_broke(&tonic::Status::unavailable(
            "connection reset"
        )));
        assert!(upload_stream_broke(&tonic::Status::unknown(
            "h2 protocol error"
        )));
        assert!(upload_stream_broke(&status_with_reason(
            ErrorKind::Aborted,
            "medai.gateway",
            "UPLOAD_IN_USE",
            "in use"
        )));
        assert!(!upload_stream_broke(&status_with_reason(
            ErrorKind::InvalidArgument,
            "medai.gateway",
            "IMAGE_TOO_LARGE",
            "too large"
        )));
        assert!(!upload_stream_broke(&status_with_reason(
            ErrorKind::Unavailable,
            "medai.gateway",
            "LEDGER_UNAVAILABLE",
            "no ledger"
        )));
    }

    #[test]
    fn the_study_key_names_the_instance_and_the_model() {
        assert_eq!(idempotency_key("1.2.3", "", ""), "1.2.3@default");
        assert_eq!(
            idempotency_key("1.2.3", "brain-mri-tumor", "1"),
            "1.2.3@brain-mri-tumor:1"
        );
    }

    #[test]
    fn formats_follow_the_extension() {
        assert_eq!(format_of(Path::new("a/b.DCM")), ImageFormat::Dicom);
        assert_eq!(format_of(Path::new("x.jpeg")), ImageFormat::Jpeg);
        assert_eq!(format_of(Path::new("x.png")), ImageFormat::Png);
        assert_eq!(format_of(Path::new("IM0001")), ImageFormat::Unspecified);
    }
}
