//! DIMSE command sets (PS3.7) the bridge sends and reads: C-ECHO and C-STORE, always encoded
//! in Implicit VR Little Endian as the standard requires for commands.

use dicom_core::{DataElement, PrimitiveValue, VR, dicom_value};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;

pub const C_STORE_RQ: u16 = 0x0001;
pub const C_STORE_RSP: u16 = 0x8001;
pub const C_ECHO_RQ: u16 = 0x0030;
pub const C_ECHO_RSP: u16 = 0x8030;
/// Command Data Set Type: no data set follows.
const NO_DATA_SET: u16 = 0x0101;

/// C-STORE statuses (PS3.4 B.2.3).
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    /// Refused: out of resources (the bridge could not store the instance).
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Error: cannot understand (the data set could not be parsed or lacks its UIDs).
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
    /// Unrecognized operation (a command the bridge does not provide).
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
}

#[derive(Debug, thiserror::Error)]
pub enum DimseError {
    #[error("the command set cannot be read: {0}")]
    Unreadable(String),
    #[error("the command set lacks {0}")]
    Missing(&'static str),
    #[error("the command set cannot be written: {0}")]
    Unwritable(String),
}

/// What the bridge needs from a received command set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub field: u16,
    pub message_id: u16,
    pub affected_sop_class_uid: String,
    pub affected_sop_instance_uid: String,
    /// Present in responses.
    pub status: Option<u16>,
}

pub fn read_command(bytes: &[u8]) -> Result<Command, DimseError> {
    let object = InMemDicomObject::read_dataset_with_ts(bytes, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .map_err(|error| DimseError::Unreadable(error.to_string()))?;
    let field = object
        .get(tags::COMMAND_FIELD)
        .and_then(|element| element.to_int::<u16>().ok())
        .ok_or(DimseError::Missing("Command Field"))?;
    let message_id = object
        .get(tags::MESSAGE_ID)
        .or_else(|| object.get(tags::MESSAGE_ID_BEING_RESPONDED_TO))
        .and_then(|element| element.to_int::<u16>().ok())
        .ok_or(DimseError::Missing("Message ID"))?;
    let text = |tag| {
        object
            .get(tag)
            .and_then(|element| element.to_str().ok())
            .map(|value| trim_uid(&value).to_owned())
            .unwrap_or_default()
    };
    Ok(Command {
        field,
        message_id,
        affected_sop_class_uid: text(tags::AFFECTED_SOP_CLASS_UID),
        affected_sop_instance_uid: text(tags::AFFECTED_SOP_INSTANCE_UID),
        status: object
            .get(tags::STATUS)
            .and_then(|element| element.to_int::<u16>().ok()),
    })
}

/// UIDs are padded to even length with NUL (and some senders use spaces).
pub fn trim_uid(value: &str) -> &str {
    value.trim_end_matches(['\0', ' '])
}

fn encode(object: &InMemDicomObject) -> Result<Vec<u8>, DimseError> {
    let mut bytes = Vec::with_capacity(128);
    object
        .write_dataset_with_ts(&mut bytes, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .map_err(|error| DimseError::Unwritable(error.to_string()))?;
    Ok(bytes)
}

fn us(tag: dicom_core::Tag, value: u16) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::US, PrimitiveValue::from(value))
}

fn ui(tag: dicom_core::Tag, value: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::UI, dicom_value!(Str, value))
}

pub fn echo_response(message_id: u16) -> Result<Vec<u8>, DimseError> {
    encode(&InMemDicomObject::command_from_element_iter([
        ui(
            tags::AFFECTED_SOP_CLASS_UID,
            dicom_dictionary_std::uids::VERIFICATION,
        ),
        us(tags::COMMAND_FIELD, C_ECHO_RSP),
        us(tags::MESSAGE_ID_BEING_RESPONDED_TO, message_id),
        us(tags::COMMAND_DATA_SET_TYPE, NO_DATA_SET),
        us(tags::STATUS, status::SUCCESS),
    ]))
}

pub fn store_response(request: &Command, status: u16) -> Result<Vec<u8>, DimseError> {
    encode(&InMemDicomObject::command_from_element_iter([
        ui(
            tags::AFFECTED_SOP_CLASS_UID,
            &request.affected_sop_class_uid,
        ),
        us(tags::COMMAND_FIELD, C_STORE_RSP),
        us(tags::MESSAGE_ID_BEING_RESPONDED_TO, request.message_id),
        us(tags::COMMAND_DATA_SET_TYPE, NO_DATA_SET),
        us(tags::STATUS, status),
        ui(
            tags::AFFECTED_SOP_INSTANCE_UID,
            &request.affected_sop_instance_uid,
        ),
    ]))
}

/// A response to a command the bridge does not provide (no Affected SOP fields known).
pub fn unrecognized_response(request: &Command) -> Result<Vec<u8>, DimseError> {
    encode(&InMemDicomObject::command_from_element_iter([
        us(tags::COMMAND_FIELD, request.field | 0x8000),
        us(tags::MESSAGE_ID_BEING_RESPONDED_TO, request.message_id),
        us(tags::COMMAND_DATA_SET_TYPE, NO_DATA_SET),
        us(tags::STATUS, status::UNRECOGNIZED_OPERATION),
    ]))
}

pub fn store_request(
    sop_class_uid: &str,
    sop_instance_uid: &str,
    message_id: u16,
) -> Result<Vec<u8>, DimseError> {
    encode(&InMemDicomObject::command_from_element_iter([
        ui(tags::AFFECTED_SOP_CLASS_UID, sop_class_uid),
        us(tags::COMMAND_FIELD, C_STORE_RQ),
        us(tags::MESSAGE_ID, message_id),
        us(tags::PRIORITY, 0),
        // Any value but 0x0101: a data set follows.
        us(tags::COMMAND_DATA_SET_TYPE, 0x0000),
        ui(tags::AFFECTED_SOP_INSTANCE_UID, sop_instance_uid),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_request_reads_back_with_its_uids_and_a_response_carries_the_status() {
        let request = store_request("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4", 7).expect("encode");
        let command = read_command(&request).expect("decode");
        assert_eq!(command.field, C_STORE_RQ);
        assert_eq!(command.message_id, 7);
        assert_eq!(command.affected_sop_class_uid, "1.2.840.10008.5.1.4.1.1.4");
        assert_eq!(command.affected_sop_instance_uid, "1.2.3.4");
        let response =
            read_command(&store_response(&command, status::OUT_OF_RESOURCES).expect("encode"))
                .expect("decode");
        assert_eq!(response.field, C_STORE_RSP);
        assert_eq!(response.message_id, 7);
        assert_eq!(response.status, Some(status::OUT_OF_RESOURCES));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(read_command(&[0xff; 7]).is_err());
        assert!(matches!(read_command(&[]), Err(DimseError::Missing(_))));
    }
}
