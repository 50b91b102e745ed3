//! The DICOM Storage SCP: C-ECHO and C-STORE over the DICOM upper layer (dicom-ul). Calling AE
//! titles outside the allow-list are rejected at association; PDU size, instance size, the
//! number of associations and their idle time are bounded. A C-STORE is answered with success
//! only once the instance is committed to the outbox. With TLS configured (DICOM TLS, PS3.15
//! Annex B) every association on the listener is TLS; a plain one is refused at its handshake.

use std::sync::Arc;
use std::time::Duration;

use dicom_dictionary_std::{tags, uids};
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::Pdu;
use dicom_ul::association::server::{AccessControl, DefaultNegotiation};
use dicom_ul::association::{AsyncServerAssociation, ServerAssociationOptions};
use dicom_ul::pdu::{AssociationRJServiceUserReason, PDataValue, PDataValueType, UserIdentity};
use dicom_ul::prelude::*;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::config::ScpSettings;
use crate::dimse::{self, Command, status};
use crate::outbox::{NewInstance, Outbox};

/// Storage SOP classes the bridge accepts (images a model may read), plus Verification.
pub(crate) const ABSTRACT_SYNTAXES: &[&str] = &[
    uids::VERIFICATION,
    uids::CT_IMAGE_STORAGE,
    uids::ENHANCED_CT_IMAGE_STORAGE,
    uids::MR_IMAGE_STORAGE,
    uids::ENHANCED_MR_IMAGE_STORAGE,
    uids::COMPUTED_RADIOGRAPHY_IMAGE_STORAGE,
    uids::DIGITAL_X_RAY_IMAGE_STORAGE_FOR_PRESENTATION,
    uids::DIGITAL_MAMMOGRAPHY_X_RAY_IMAGE_STORAGE_FOR_PRESENTATION,
    uids::ULTRASOUND_IMAGE_STORAGE,
    uids::ULTRASOUND_MULTI_FRAME_IMAGE_STORAGE,
    uids::SECONDARY_CAPTURE_IMAGE_STORAGE,
    uids::MULTI_FRAME_GRAYSCALE_BYTE_SECONDARY_CAPTURE_IMAGE_STORAGE,
    uids::MULTI_FRAME_GRAYSCALE_WORD_SECONDARY_CAPTURE_IMAGE_STORAGE,
    uids::MULTI_FRAME_TRUE_COLOR_SECONDARY_CAPTURE_IMAGE_STORAGE,
    uids::NUCLEAR_MEDICINE_IMAGE_STORAGE,
    uids::POSITRON_EMISSION_TOMOGRAPHY_IMAGE_STORAGE,
    uids::X_RAY_ANGIOGRAPHIC_IMAGE_STORAGE,
];

/// Transfer syntaxes the bridge stores as they come (the validation service decodes them).
pub(crate) const TRANSFER_SYNTAXES: &[&str] = &[
    uids::EXPLICIT_VR_LITTLE_ENDIAN,
    uids::IMPLICIT_VR_LITTLE_ENDIAN,
    // Explicit VR Big Endian: retired, but old modalities still send it.
    "1.2.840.10008.1.2.2",
    uids::JPEG_BASELINE8_BIT,
    uids::JPEG_EXTENDED12_BIT,
    uids::JPEG_LOSSLESS,
    uids::JPEG_LOSSLESS_SV1,
    uids::JPEGLS_LOSSLESS,
    uids::JPEGLS_NEAR_LOSSLESS,
    uids::JPEG2000_LOSSLESS,
    uids::JPEG2000,
    uids::RLE_LOSSLESS,
];

/// A command set is a few hundred bytes; anything much larger is not one.
const MAX_COMMAND_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AssociationError {
    #[error("the association could not be established: {0}")]
    Establish(String),
    #[error("the TLS handshake did not complete in time")]
    HandshakeTimeout,
    #[error("the association failed: {0}")]
    Transport(String),
    #[error("the peer broke the protocol: {0}")]
    Protocol(&'static str),
    #[error("an instance exceeds the limit of {limit} bytes")]
    InstanceTooLarge { limit: usize },
    #[error(transparent)]
    Dimse(#[from] dimse::DimseError),
}

/// Who may associate: the called title must be the bridge's own, the calling title on the list.
struct AllowList {
    calling_ae_titles: Vec<String>,
}

impl AccessControl for AllowList {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        if called_ae_title.trim() != this_ae_title.trim() {
            return Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized);
        }
        let calling = calling_ae_title.trim();
        if !self
            .calling_ae_titles
            .iter()
            .any(|allowed| allowed.trim() == calling)
        {
            return Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized);
        }
        Ok(())
    }
}

pub struct StorageScp {
    settings: ScpSettings,
    outbox: Outbox,
    associations: Arc<Semaphore>,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl StorageScp {
    pub fn new(settings: ScpSettings, outbox: Outbox) -> Self {
        let associations = Arc::new(Semaphore::new(settings.max_associations));
        Self {
            settings,
            outbox,
            associations,
            tls: None,
        }
    }

    /// Serves DICOM TLS only on this SCP's listener.
    #[must_use]
    pub fn with_tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// Accepts associations until `shutdown` completes; each is served on its own task.
    pub async fn run(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown => return,
                accepted = listener.accept() => accepted,
            };
            let (socket, _peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(error = %error, "accept failed");
                    continue;
                }
            };
            let Ok(permit) = self.associations.clone().try_acquire_owned() else {
                metrics::counter!("medai_bridge_associations_refused_total", "reason" => "limit")
                    .increment(1);
                tracing::warn!(
                    limit = self.settings.max_associations,
                    "association limit reached; connection closed"
                );
                drop(socket);
                continue;
            };
            let scp = self.clone();
            tokio::spawn(async move {
                if let Err(error) = scp.serve_association(socket).await {
                    tracing::warn!(error = %error, "association ended with an error");
                }
                drop(permit);
            });
        }
    }

    fn options(&self) -> ServerAssociationOptions<'static, AllowList, DefaultNegotiation> {
        let idle = Duration::from_secs(self.settings.idle_timeout_seconds);
        let mut options = ServerAssociationOptions::new()
            .ae_access_control(AllowList {
                calling_ae_titles: self.settings.allowed_calling_ae_titles.clone(),
            })
            .ae_title(self.settings.ae_title.clone())
            .strict(true)
            .max_pdu_length(self.settings.max_pdu_length)
            .read_timeout(idle)
            .write_timeout(idle);
        for abstract_syntax in ABSTRACT_SYNTAXES {
            options = options.with_abstract_syntax(*abstract_syntax);
        }
        for transfer_syntax in TRANSFER_SYNTAXES {
            options = options.with_transfer_syntax(*transfer_syntax);
        }
        options
    }

    async fn serve_association(&self, socket: TcpStream) -> Result<(), AssociationError> {
        let Some(tls) = &self.tls else {
            let association = self
                .options()
                .establish_async(socket)
                .await
                .map_err(refused_at_negotiation)?;
            return self.serve_established(association).await;
        };
        // The handshake is bounded like any silence on an association.
        let idle = Duration::from_secs(self.settings.idle_timeout_seconds);
        let establishing = self.options().tls_config(tls.clone());
        let association = tokio::time::timeout(idle, establishing.establish_tls_async(socket))
            .await
            .map_err(|_| {
                metrics::counter!("medai_bridge_associations_refused_total", "reason" => "tls")
                    .increment(1);
                AssociationError::HandshakeTimeout
            })?
            .map_err(refused_at_negotiation)?;
        self.serve_established(association).await
    }

    async fn serve_established<S>(
        &self,
        association: AsyncServerAssociation<S>,
    ) -> Result<(), AssociationError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let calling_ae_title = association.peer_ae_title().trim().to_owned();
        tracing::info!(calling_ae_title = %calling_ae_title, "association accepted");
        let mut session = Session {
            association,
            calling_ae_title,
            command: Vec::new(),
            data: Vec::new(),
            pending_store: None,
        };
        let outcome = self.run_session(&mut session).await;
        if outcome.is_err() {
            let _ = session.association.abort().await;
        }
        outcome
    }

    async fn run_session<S>(&self, session: &mut Session<S>) -> Result<(), AssociationError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        loop {
            let pdu = session
                .association
                .receive()
                .await
                .map_err(|error| AssociationError::Transport(error.to_string()))?;
            match pdu {
                Pdu::PData { data } => {
                    for value in data {
                        self.take_value(session, value).await?;
                    }
                }
                Pdu::ReleaseRQ => {
                    session
                        .association
                        .send(&Pdu::ReleaseRP)
                        .await
                        .map_err(|error| AssociationError::Transport(error.to_string()))?;
                    tracing::info!(calling_ae_title = %session.calling_ae_title, "association released");
                    return Ok(());
                }
                Pdu::AbortRQ { .. } => return Ok(()),
                _ => {
                    return Err(AssociationError::Protocol(
                        "unexpected PDU during an association",
                    ));
                }
            }
        }
    }

    async fn take_value<S>(
        &self,
        session: &mut Session<S>,
        value: PDataValue,
    ) -> Result<(), AssociationError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        match value.value_type {
            PDataValueType::Command => {
                if session.command.len() + value.data.len() > MAX_COMMAND_BYTES {
                    return Err(AssociationError::Protocol("command set too large"));
                }
                session.command.extend_from_slice(&value.data);
                if !value.is_last {
                    return Ok(());
                }
                let command = dimse::read_command(&std::mem::take(&mut session.command))?;
                match command.field {
                    dimse::C_ECHO_RQ => {
                        let response = dimse::echo_response(command.message_id)?;
                        session
                            .send_command(value.presentation_context_id, response)
                            .await
                    }
                    dimse::C_STORE_RQ => {
                        session.data.clear();
                        session.pending_store = Some((command, value.presentation_context_id));
                        Ok(())
                    }
                    _ => {
                        let response = dimse::unrecognized_response(&command)?;
                        session
                            .send_command(value.presentation_context_id, response)
                            .await
                    }
                }
            }
            PDataValueType::Data => {
                if session.pending_store.is_none() {
                    return Err(AssociationError::Protocol(
                        "a data set without a C-STORE command",
                    ));
                }
                if session.data.len() + value.data.len() > self.settings.max_instance_bytes {
                    metrics::counter!("medai_bridge_instances_refused_total", "reason" => "too_large")
                        .increment(1);
                    return Err(AssociationError::InstanceTooLarge {
                        limit: self.settings.max_instance_bytes,
                    });
                }
                session.data.extend_from_slice(&value.data);
                if !value.is_last {
                    return Ok(());
                }
                let Some((command, context_id)) = session.pending_store.take() else {
                    return Err(AssociationError::Protocol(
                        "a data set without a C-STORE command",
                    ));
                };
                let data = std::mem::take(&mut session.data);
                let transfer_syntax = session
                    .association
                    .presentation_contexts()
                    .iter()
                    .find(|context| context.id == context_id)
                    .map(|context| context.transfer_syntax.clone())
                    .ok_or(AssociationError::Protocol(
                        "data on an unknown presentation context",
                    ))?;
                let status = self
                    .store_instance(&command, &transfer_syntax, data, &session.calling_ae_title)
                    .await;
                let response = dimse::store_response(&command, status)?;
                session.send_command(context_id, response).await
            }
        }
    }

    /// Stores one received instance and returns the C-STORE status to answer with.
    async fn store_instance(
        &self,
        command: &Command,
        transfer_syntax_uid: &str,
        data: Vec<u8>,
        calling_ae_title: &str,
    ) -> u16 {
        let instance = match part10_instance(transfer_syntax_uid, data, calling_ae_title) {
            Ok(instance) => instance,
            Err(reason) => {
                metrics::counter!("medai_bridge_instances_refused_total", "reason" => "unreadable")
                    .increment(1);
                tracing::warn!(reason, "instance refused: cannot understand");
                return status::CANNOT_UNDERSTAND;
            }
        };
        if instance.sop_instance_uid != command.affected_sop_instance_uid {
            tracing::warn!("instance refused: its SOP Instance UID differs from the command's");
            return status::CANNOT_UNDERSTAND;
        }
        match self.outbox.store(instance).await {
            Ok(stored_now) => {
                metrics::counter!("medai_bridge_instances_received_total").increment(1);
                tracing::info!(duplicate = !stored_now, "instance stored");
                status::SUCCESS
            }
            Err(error) => {
                tracing::error!(error = %error, "instance not stored; refused with out of resources");
                status::OUT_OF_RESOURCES
            }
        }
    }
}

/// An association refused while negotiating (AE titles, contexts, or TLS), counted by reason.
fn refused_at_negotiation(error: dicom_ul::association::Error) -> AssociationError {
    let reason = match &error {
        dicom_ul::association::Error::TlsHandshake { .. }
        | dicom_ul::association::Error::TlsNotSupported => "tls",
        _ => "negotiation",
    };
    metrics::counter!("medai_bridge_associations_refused_total", "reason" => reason).increment(1);
    AssociationError::Establish(error.to_string())
}

struct Session<S> {
    association: AsyncServerAssociation<S>,
    calling_ae_title: String,
    command: Vec<u8>,
    data: Vec<u8>,
    pending_store: Option<(Command, u8)>,
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    async fn send_command(
        &mut self,
        context_id: u8,
        command: Vec<u8>,
    ) -> Result<(), AssociationError> {
        let pdu = Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: context_id,
                value_type: PDataValueType::Command,
                is_last: true,
                data: command,
            }],
        };
        self.association
            .send(&pdu)
            .await
            .map_err(|error| AssociationError::Transport(error.to_string()))
    }
}

/// The received data set as a Part 10 file (preamble, meta group, the data set bytes exactly
/// as received), with the UIDs read from it.
pub fn part10_instance(
    transfer_syntax_uid: &str,
    data: Vec<u8>,
    calling_ae_title: &str,
) -> Result<NewInstance, &'static str> {
    let transfer_syntax = TransferSyntaxRegistry
        .get(transfer_syntax_uid)
        .ok_or("unknown transfer syntax")?;
    let object = InMemDicomObject::read_dataset_with_ts(data.as_slice(), transfer_syntax)
        .map_err(|_| "the data set cannot be parsed")?;
    let uid = |tag, name: &'static str| -> Result<String, &'static str> {
        let value = object
            .get(tag)
            .and_then(|element| element.to_str().ok())
            .map(|value| dimse::trim_uid(&value).to_owned())
            .filter(|value| !value.is_empty())
            .ok_or(name)?;
        if crate::uids::is_valid_uid(&value) {
            Ok(value)
        } else {
            Err(name)
        }
    };
    let sop_class_uid = uid(tags::SOP_CLASS_UID, "SOP Class UID missing or invalid")?;
    let sop_instance_uid = uid(
        tags::SOP_INSTANCE_UID,
        "SOP Instance UID missing or invalid",
    )?;
    let series_instance_uid = uid(
        tags::SERIES_INSTANCE_UID,
        "Series Instance UID missing or invalid",
    )?;
    let study_instance_uid = uid(
        tags::STUDY_INSTANCE_UID,
        "Study Instance UID missing or invalid",
    )?;
    drop(object);
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(sop_class_uid.as_str())
        .media_storage_sop_instance_uid(sop_instance_uid.as_str())
        .transfer_syntax(transfer_syntax_uid)
        .build()
        .map_err(|_| "the file meta group cannot be built")?;
    let mut file = vec![0u8; 128];
    file.extend_from_slice(b"DICM");
    meta.write(&mut file)
        .map_err(|_| "the file meta group cannot be written")?;
    file.extend_from_slice(&data);
    Ok(NewInstance {
        sop_instance_uid,
        sop_class_uid,
        series_instance_uid,
        study_instance_uid,
        calling_ae_title: calling_ae_title.to_owned(),
        dicom: file,
    })
}
