//! Sends Structured Reports to the destination AE by C-STORE (dicom-ul as SCU), over plain
//! TCP or DICOM TLS.

use std::time::Duration;

use dicom_dictionary_std::uids;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::association::client::AsyncClientAssociation;
use dicom_ul::pdu::{PDataValue, PDataValueType, PresentationContextResultReason};
use dicom_ul::{ClientAssociationOptions, Pdu};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::dimse::{self, status};

const TIMEOUT: Duration = Duration::from_secs(30);
/// A PDV item's length (4), presentation context id (1) and control header (1).
const PDV_HEADER: u32 = 6;

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("cannot associate with the destination: {0}")]
    Associate(String),
    #[error("the destination accepted no transfer syntax for Comprehensive SR")]
    NoPresentationContext,
    #[error("the report cannot be encoded: {0}")]
    Encode(String),
    #[error("the transfer failed: {0}")]
    Transport(String),
    #[error("the destination answered with something other than a C-STORE response")]
    UnexpectedAnswer,
    #[error("the destination refused the report with status {0:#06x}")]
    Refused(u16),
    #[error(transparent)]
    Dimse(#[from] dimse::DimseError),
}

/// One association to the destination, for sending a batch of reports.
pub struct ReportSender<S = TcpStream> {
    association: AsyncClientAssociation<S>,
    context_id: u8,
    transfer_syntax: String,
    next_message_id: u16,
}

fn association_options(
    called_ae_title: &str,
    calling_ae_title: &str,
) -> ClientAssociationOptions<'static> {
    ClientAssociationOptions::new()
        .calling_ae_title(calling_ae_title.to_owned())
        .called_ae_title(called_ae_title.to_owned())
        .with_presentation_context(
            uids::COMPREHENSIVE_SR_STORAGE,
            vec![
                uids::EXPLICIT_VR_LITTLE_ENDIAN,
                uids::IMPLICIT_VR_LITTLE_ENDIAN,
            ],
        )
        .connection_timeout(TIMEOUT)
        .read_timeout(TIMEOUT)
        .write_timeout(TIMEOUT)
}

impl ReportSender<TcpStream> {
    pub async fn connect(
        address: &str,
        called_ae_title: &str,
        calling_ae_title: &str,
    ) -> Result<Self, DeliveryError> {
        let association = association_options(called_ae_title, calling_ae_title)
            .establish_async(address)
            .await
            .map_err(|error| DeliveryError::Associate(error.to_string()))?;
        Self::accepted(association).await
    }
}

impl ReportSender<dicom_ul::association::client::AsyncTlsStream> {
    /// The same over DICOM TLS: the destination's certificate is checked for `server_name`.
    pub async fn connect_tls(
        address: &str,
        called_ae_title: &str,
        calling_ae_title: &str,
        tls: std::sync::Arc<rustls::ClientConfig>,
        server_name: &str,
    ) -> Result<Self, DeliveryError> {
        let association = association_options(called_ae_title, calling_ae_title)
            .tls_config(tls)
            .server_name(server_name)
            .establish_tls_async(address)
            .await
            .map_err(|error| DeliveryError::Associate(error.to_string()))?;
        Self::accepted(association).await
    }
}

impl<S> ReportSender<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    async fn accepted(association: AsyncClientAssociation<S>) -> Result<Self, DeliveryError> {
        let Some(context) = association
            .presentation_contexts()
            .iter()
            .find(|context| context.reason == PresentationContextResultReason::Acceptance)
        else {
            let _ = association.abort().await;
            return Err(DeliveryError::NoPresentationContext);
        };
        let context_id = context.id;
        let transfer_syntax = context.transfer_syntax.clone();
        Ok(Self {
            association,
            context_id,
            transfer_syntax,
            next_message_id: 1,
        })
    }

    /// C-STOREs one report and waits for the destination's status.
    pub async fn store(
        &mut self,
        sop_instance_uid: &str,
        dataset: &InMemDicomObject,
    ) -> Result<(), DeliveryError> {
        let transfer_syntax = TransferSyntaxRegistry
            .get(&self.transfer_syntax)
            .ok_or_else(|| DeliveryError::Encode("unknown transfer syntax".to_owned()))?;
        let mut data = Vec::with_capacity(8 * 1024);
        dataset
            .write_dataset_with_ts(&mut data, transfer_syntax)
            .map_err(|error| DeliveryError::Encode(error.to_string()))?;
        let message_id = self.next_message_id;
        self.next_message_id = self.next_message_id.wrapping_add(1).max(1);
        let command =
            dimse::store_request(uids::COMPREHENSIVE_SR_STORAGE, sop_instance_uid, message_id)?;
        self.association
            .send(&Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: self.context_id,
                    value_type: PDataValueType::Command,
                    is_last: true,
                    data: command,
                }],
            })
            .await
            .map_err(|error| DeliveryError::Transport(error.to_string()))?;
        // The data set in P-DATA PDUs no larger than the destination accepts (built here rather
        // than with dicom-ul's PDataWriter, whose drop blocks and so needs a multi-threaded
        // runtime).
        let peer_limit = self.association.acceptor_max_pdu_length();
        let peer_limit = if peer_limit == 0 { 16_384 } else { peer_limit };
        let fragment = usize::try_from(peer_limit.saturating_sub(PDV_HEADER))
            .unwrap_or(16_378)
            .max(1);
        let mut chunks = data.chunks(fragment).peekable();
        while let Some(chunk) = chunks.next() {
            self.association
                .send(&Pdu::PData {
                    data: vec![PDataValue {
                        presentation_context_id: self.context_id,
                        value_type: PDataValueType::Data,
                        is_last: chunks.peek().is_none(),
                        data: chunk.to_vec(),
                    }],
                })
                .await
                .map_err(|error| DeliveryError::Transport(error.to_string()))?;
        }
        let answer = self
            .association
            .receive()
            .await
            .map_err(|error| DeliveryError::Transport(error.to_string()))?;
        let Pdu::PData { data } = answer else {
            return Err(DeliveryError::UnexpectedAnswer);
        };
        let command_bytes: Vec<u8> = data
            .into_iter()
            .filter(|value| value.value_type == PDataValueType::Command)
            .flat_map(|value| value.data)
            .collect();
        let response = dimse::read_command(&command_bytes)?;
        if response.field != dimse::C_STORE_RSP {
            return Err(DeliveryError::UnexpectedAnswer);
        }
        match response.status {
            // Success, and the warnings that still mean stored (PS3.4 B.2.3).
            Some(status::SUCCESS | 0x0001 | 0x0107 | 0x0116 | 0xB000..=0xBFFF) => Ok(()),
            Some(code) => Err(DeliveryError::Refused(code)),
            None => Err(DeliveryError::UnexpectedAnswer),
        }
    }

    pub async fn release(self) {
        let _ = self.association.release().await;
    }
}
