//! The gRPC edge of the auth service: proto messages in, domain calls, proto messages out.

use std::sync::Arc;

use medai_proto::auth::v1 as pb;
use medai_proto::auth::v1::auth_service_server::AuthService;
use medai_revocation::TokenFacts;
use tonic::{Request, Response, Status};

use crate::authority::{Actor, Authority, TokenGrant};
use crate::error::AuthError;

pub struct AuthApi {
    pub authority: Arc<Authority>,
}

impl From<TokenGrant> for pb::TokenGrant {
    fn from(grant: TokenGrant) -> Self {
        Self {
            access_token: grant.access_token,
            expires_in_seconds: grant.expires_in_seconds,
            role: grant.role.as_str().to_owned(),
            refresh_token: grant.refresh_token,
            refresh_expires_in_seconds: grant.refresh_expires_in_seconds,
        }
    }
}

/// The gateway passes the verified caller; an empty one is a gateway bug, never trusted.
fn actor(subject: String, correlation_id: String) -> Result<Actor, AuthError> {
    if subject.is_empty() {
        return Err(AuthError::Internal(
            "a request arrived without its actor".to_owned(),
        ));
    }
    Ok(Actor {
        subject,
        correlation_id,
    })
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    async fn login(
        &self,
        request: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let request = request.into_inner();
        let grant = self
            .authority
            .login(
                &request.username,
                &request.password,
                &request.correlation_id,
            )
            .await?;
        Ok(Response::new(pb::LoginResponse {
            grant: Some(grant.into()),
        }))
    }

    async fn refresh(
        &self,
        request: Request<pb::RefreshRequest>,
    ) -> Result<Response<pb::RefreshResponse>, Status> {
        let request = request.into_inner();
        let grant = self
            .authority
            .refresh(&request.refresh_token, &request.correlation_id)
            .await?;
        Ok(Response::new(pb::RefreshResponse {
            grant: Some(grant.into()),
        }))
    }

    async fn logout(
        &self,
        request: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutResponse>, Status> {
        let request = request.into_inner();
        let actor = actor(request.actor, request.correlation_id)?;
        let refresh = (!request.refresh_token.is_empty()).then_some(request.refresh_token.as_str());
        self.authority
            .logout(
                &actor,
                &request.access_token_id,
                request.access_token_expires_at,
                refresh,
            )
            .await?;
        Ok(Response::new(pb::LogoutResponse {}))
    }

    async fn check_revocation(
        &self,
        request: Request<pb::CheckRevocationRequest>,
    ) -> Result<Response<pb::CheckRevocationResponse>, Status> {
        let request = request.into_inner();
        let facts = TokenFacts {
            jti: &request.token_id,
            subject: &request.subject,
            generation: request.generation,
        };
        let revoked = self.authority.is_revoked(facts).await?;
        Ok(Response::new(pb::CheckRevocationResponse { revoked }))
    }

    async fn get_signing_keys(
        &self,
        _request: Request<pb::GetSigningKeysRequest>,
    ) -> Result<Response<pb::GetSigningKeysResponse>, Status> {
        let keys = self
            .authority
            .keys
            .published()
            .await
            .map_err(|error| AuthError::Internal(error.to_string()))?;
        let keys = keys
            .into_iter()
            .map(|key| pb::JsonWebKey {
                kty: key.kty,
                crv: key.crv,
                x: key.x,
                kid: key.kid,
                alg: key.alg,
                r#use: "sig".to_owned(),
            })
            .collect();
        Ok(Response::new(pb::GetSigningKeysResponse { keys }))
    }

    async fn rotate_signing_key(
        &self,
        request: Request<pb::RotateSigningKeyRequest>,
    ) -> Result<Response<pb::RotateSigningKeyResponse>, Status> {
        let request = request.into_inner();
        let (kid, signs_from) = self
            .authority
            .rotate_signing_key(&actor(request.actor, request.correlation_id)?)
            .await?;
        Ok(Response::new(pb::RotateSigningKeyResponse {
            kid,
            signs_from,
        }))
    }

    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        let request = request.into_inner();
        let actor = actor(request.actor, request.correlation_id)?;
        let user_id = self
            .authority
            .create_user(&actor, &request.username, &request.password, &request.role)
            .await?;
        Ok(Response::new(pb::CreateUserResponse { user_id }))
    }

    async fn set_user_role(
        &self,
        request: Request<pb::SetUserRoleRequest>,
    ) -> Result<Response<pb::SetUserRoleResponse>, Status> {
        let request = request.into_inner();
        self.authority
            .set_role(
                &actor(request.actor, request.correlation_id)?,
                &request.username,
                &request.role,
            )
            .await?;
        Ok(Response::new(pb::SetUserRoleResponse {}))
    }

    async fn disable_user(
        &self,
        request: Request<pb::DisableUserRequest>,
    ) -> Result<Response<pb::DisableUserResponse>, Status> {
        let request = request.into_inner();
        self.authority
            .disable(
                &actor(request.actor, request.correlation_id)?,
                &request.username,
            )
            .await?;
        Ok(Response::new(pb::DisableUserResponse {}))
    }

    async fn reset_user_password(
        &self,
        request: Request<pb::ResetUserPasswordRequest>,
    ) -> Result<Response<pb::ResetUserPasswordResponse>, Status> {
        let request = request.into_inner();
        let actor = actor(request.actor, request.correlation_id)?;
        self.authority
            .reset_password(&actor, &request.username, &request.new_password)
            .await?;
        Ok(Response::new(pb::ResetUserPasswordResponse {}))
    }

    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        let request = request.into_inner();
        self.authority
            .delete(
                &actor(request.actor, request.correlation_id)?,
                &request.username,
            )
            .await?;
        Ok(Response::new(pb::DeleteUserResponse {}))
    }

    async fn change_password(
        &self,
        request: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::ChangePasswordResponse>, Status> {
        let request = request.into_inner();
        let actor = actor(request.actor, request.correlation_id)?;
        self.authority
            .change_password(&actor, &request.current_password, &request.new_password)
            .await?;
        Ok(Response::new(pb::ChangePasswordResponse {}))
    }

    async fn reauthenticate(
        &self,
        request: Request<pb::ReauthenticateRequest>,
    ) -> Result<Response<pb::ReauthenticateResponse>, Status> {
        let request = request.into_inner();
        let actor = actor(request.actor, request.correlation_id)?;
        let (signing_ticket, expires_in_seconds) = self
            .authority
            .reauthenticate(&actor, &request.password)
            .await?;
        Ok(Response::new(pb::ReauthenticateResponse {
            signing_ticket,
            expires_in_seconds,
        }))
    }

    async fn consume_signing_ticket(
        &self,
        request: Request<pb::ConsumeSigningTicketRequest>,
    ) -> Result<Response<pb::ConsumeSigningTicketResponse>, Status> {
        let request = request.into_inner();
        let actor = actor(request.actor, request.correlation_id)?;
        let (username, role) = self
            .authority
            .consume_signing_ticket(&actor, &request.signing_ticket)
            .await?;
        Ok(Response::new(pb::ConsumeSigningTicketResponse {
            username,
            role: role.as_str().to_owned(),
        }))
    }
}
